"""The documentation: strict mkdocs build, runnable snippets, and a numpydoc docstring
with an Examples section on every public class and function."""

import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import skinfluence

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _public_objects():
    """(qualified name, object) for skinfluence.__all__ and every public submodule's
    public classes and functions."""
    seen, found = set(), []

    def add(qualname, obj):
        if id(obj) not in seen and (inspect.isclass(obj) or inspect.isfunction(obj)):
            seen.add(id(obj))
            found.append((qualname, obj))

    for name in skinfluence.__all__:
        add(f"skinfluence.{name}", getattr(skinfluence, name))
    for info in pkgutil.walk_packages(skinfluence.__path__, "skinfluence."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, o in vars(module).items()
                     if not n.startswith("_") and getattr(o, "__module__", None) == info.name]
        for name in names:
            add(f"{info.name}.{name}", getattr(module, name))
    return found


def _has_examples(obj) -> bool:
    doc = inspect.getdoc(obj) or ""
    match = re.search(r"^Examples\n-{8,}\n(.*?)(?=^\S.*\n-{3,}\n|\Z)", doc, re.S | re.M)
    return bool(match) and ">>>" in match.group(1)


def test_every_public_class_and_function_has_a_runnable_example():
    objects = _public_objects()
    assert len(objects) > 5
    # Exceptions are raised by the library, not called by users: no example needed.
    missing = sorted(
        name for name, obj in objects
        if not (inspect.isclass(obj) and issubclass(obj, Exception)) and not _has_examples(obj)
    )
    assert not missing, "numpydoc Examples section (with >>> lines) missing on: " + ", ".join(
        missing
    )


def test_docstrings_are_numpydoc():
    bad = []
    for name, obj in _public_objects():
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            bad.append(f"{name}: no docstring")
            continue
        if inspect.isfunction(obj) and inspect.signature(obj).parameters:
            if not re.search(r"^Parameters\n-{10,}$", doc, re.M):
                bad.append(f"{name}: no Parameters section")
        if re.search(r":param |:returns?:", doc):
            bad.append(f"{name}: Sphinx field lists instead of numpydoc sections")
    assert not bad, "\n".join(bad)


def test_concepts_states_sign_and_scale_verbatim():
    from skinfluence.scorers import SIGN_AND_SCALE

    text = " ".join((DOCS / "concepts.md").read_text().split())
    assert " ".join(SIGN_AND_SCALE.split()) in text


def test_docs_reference_only_existing_images():
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name}: missing image {target}"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


@pytest.mark.parametrize("page", ["getting-started.md", "sklearn-integration.md"])
def test_snippets_run(page, tmp_path, monkeypatch):
    """The python blocks of a page run top to bottom in one namespace."""
    blocks = _python_blocks(DOCS / page)
    assert blocks
    monkeypatch.chdir(tmp_path)  # snippets may save figures
    namespace = {"__name__": f"docs_{page.replace('-', '_')[:-3]}"}
    import matplotlib

    matplotlib.use("Agg")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    try:
        for k, block in enumerate(blocks):
            code = compile(block, f"{page}[block {k}]", "exec")
            exec(code, namespace)
    finally:
        torch.set_num_threads(threads)
        import matplotlib.pyplot as plt

        plt.close("all")


def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict``: broken links, missing pages and API objects that do
    not exist fail the build. Needs the docs tools of the ``test`` extra."""
    for tool in ("mkdocs", "mkdocstrings", "material"):
        if importlib.util.find_spec(tool) is None:
            pytest.fail(f"{tool} is not installed; install the test extra: pip install -e '.[test]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "scorers" / "index.html").read_text()
    assert "DirectInfluenceScorer" in api and "Examples" in api
    # value sets render as written, not parsed as code ("gauss-newton" as gauss - newton)
    assert "gauss - newton" not in api
    assert "<code>{&#34;exact&#34;, &#34;gauss-newton&#34;, &#34;empirical-fisher&#34;}</code>" in api
    assert not (tmp_path / "site" / "hooks").exists()  # the build's own code stays out


def test_direct_speed_up_is_the_one_of_its_results_file():
    """README and the method guide quote the Direct speed-up of the same run
    (benchmarks/results/matrix_free.md, panel B), and name the two-thread run too."""
    results = (ROOT / "benchmarks" / "results" / "matrix_free.md").read_text()
    panel_b = results.split("<!-- panel-b -->")[1].split("<!-- /panel-b -->")[0]
    measured = re.search(r"^\| Direct \|[^|]*\|[^|]*\| ([\d.]+x) \|", panel_b, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    guide = (DOCS / "choosing-a-method.md").read_text()
    assert re.search(r"^\s*\| `DirectInfluenceScorer` \| ([\d.]+x) \|", readme, re.M).group(1) == measured
    assert re.search(r"^\| Direct \|[^|]*\|[^|]*\| ([\d.]+x) \|", guide, re.M).group(1) == measured
    two_threads = (ROOT / "benchmarks" / "results" / "direct.md").read_text()
    other = re.search(r"^\| panel B[^|]*\|[^|]*\|[^|]*\| ([\d.]+x) \|", two_threads, re.M).group(1)
    for page in (readme, guide):
        assert other in page and "benchmarks/results/direct.md" in page


def test_getting_started_installs_from_a_clone_as_the_readme_does():
    """No registry serves skinfluence: the install is the README's, from a clone, and
    every extra of pyproject.toml is named."""
    import tomllib

    page = (DOCS / "getting-started.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"pip install \"?skinfluence\b", page)
    command = 'python3.11 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[plot]"'
    assert command in readme and command in page
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in extras:
        assert f"| `{extra}` |" in page, f"extra {extra!r} not described in getting-started.md"


def test_concepts_says_what_a_perturbation_sign_means_and_it_holds():
    """concepts.md: moving x_j along +e_k by eps changes I[i, j] by eps * P[i, j, k] and,
    once refit, the test loss by about -eps * P[i, j, k] / n_train. Checked by refitting."""
    import numpy as np
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from skinfluence import DirectInfluenceScorer

    text = " ".join((DOCS / "concepts.md").read_text().split())
    assert "by about \\(\\epsilon\\,P[i, j, k]\\)" in text
    assert "more helpful to test point i" in text
    assert "\\(-\\epsilon\\,P[i, j, k] / n_{train}\\)" in text

    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)[:, :5]
    Xtr, ytr, Xte, yte = X[:150], y[:150], X[150:160], y[150:160]

    def fit(features):
        return LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit(features, ytr)

    def test_loss(model):
        return -np.log(model.predict_proba(Xte)[np.arange(len(yte)), yte])

    model = fit(Xtr)
    up = DirectInfluenceScorer(model, regularization=0.0).fit(Xtr, ytr)
    P = DirectInfluenceScorer(model, regularization=0.0, mode="perturbation").fit(Xtr, ytr).transform(Xte, yte)
    eps = 1e-3
    for j, k in [(3, 0), (40, 4)]:
        moved = Xtr.copy()
        moved[j, k] += eps
        change = up.influences(Xte, yte, moved[[j]], ytr[[j]]) - up.influences(Xte, yte, Xtr[[j]], ytr[[j]])
        np.testing.assert_allclose(change[:, 0], eps * P[:, j, k], rtol=1e-2, atol=1e-9)
        refit = test_loss(fit(moved)) - test_loss(model)
        np.testing.assert_allclose(refit, -eps * P[:, j, k] / len(ytr), rtol=2e-2, atol=1e-9)


def test_readme_says_how_long_the_suite_takes_and_that_it_builds_the_docs():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert re.search(r"The suite takes about \d+ minutes on a 2-core machine", readme)
    assert "builds the documentation with `mkdocs build --strict`" in readme
    assert "def test_mkdocs_build_strict" in Path(__file__).read_text()
