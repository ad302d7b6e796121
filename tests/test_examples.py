"""Every script in examples/ runs in its fast mode, saves its figures and says what to
look at, so the examples cannot silently rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))

# The figures each plotting example promises (the docs embed them under these names).
FIGURES = {
    "plot_wine_outliers.py": [
        "wine_influence_histogram.png", "wine_agreement.png", "wine_feature_influence.png",
    ],
    "plot_blobs_mislabeling.py": ["blobs_influence.png"],
    "plot_digits_cnn.py": [
        "digits_influence_by_label.png", "digits_top_influential.png", "digits_suspects.png",
    ],
    "plot_resnet_influence.py": [
        "resnet_top_influential.png", "resnet_influence_by_label.png", "resnet_mean_influence.png",
    ],
    "plot_tuning_gridsearch.py": ["tuning_grid.png"],
    "plot_trust_digits.py": ["trust_digits.png"],
    "plot_removal_effects.py": ["removal_source.png", "removal_by_size.png"],
}


def _run(script: Path, out: Path) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), "--fast"],
        capture_output=True, text=True, timeout=150, env=env, cwd=out.parent,
    )
    assert proc.returncode == 0, (
        f"{script.name} --fast failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def test_every_plotting_example_is_listed():
    plotting = {p.name for p in SCRIPTS if p.name.startswith("plot_")}
    assert plotting == set(FIGURES), "add the figures of a new example to FIGURES"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs_fast(script, tmp_path):
    out = tmp_path / "out"
    stdout = _run(script, out)
    for name in FIGURES.get(script.name, []):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    if script.name in FIGURES:
        assert "What to look at" in stdout
    if script.name == "plot_blobs_mislabeling.py":
        _check_blobs_report(stdout)


def _check_blobs_report(stdout: str) -> None:
    """The numbers the blobs example prints are the ones it computed: CG matches Direct
    on a convex model, and influence ranks the flipped labels well above chance."""
    pearson = float(re.search(r"CG vs Direct: Pearson ([0-9.]+)", stdout).group(1))
    assert pearson > 0.9999
    aurocs = [float(a) for a in re.findall(r"flipped labels: ([0-9.]+)", stdout)]
    assert len(aurocs) == 2 and min(aurocs) > 0.8
