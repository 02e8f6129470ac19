"""The README's two set-up commands stay true: CI runs the test one verbatim, and the run one ends in `convbn`."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    setup = [c for c in _commands() if c.startswith("pip install torch==2.13.0")]
    assert len(setup) == 2, setup
    run, test = setup
    assert run.endswith("&& convbn") and test.endswith("&& python -m pytest")
    assert test in (ROOT / ".ci" / "run").read_text()


def test_torch_is_the_only_hard_dependency_and_is_not_upper_pinned():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.M | re.S).group(1)
    assert [d.strip().strip('"') for d in deps.split(",") if d.strip()] == ["torch>=2.3"]
