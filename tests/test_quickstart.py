"""The README's quickstart: its commands, the CI script, and the main demo."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)


def test_readme_has_exactly_two_quickstart_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert "examples/quickstart_demo.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_quickstart_demo_runs_and_finds_flipped_labels(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import quickstart_demo
    finally:
        sys.path.pop(0)
    report = quickstart_demo.main([str(tmp_path), "--fast"])
    assert (tmp_path / "quickstart_self_influence.png").stat().st_size > 10_000
    # self-influence ranks flipped labels far better than chance
    assert report["auroc_self"] > 0.75
