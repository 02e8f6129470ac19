"""The README's set-up commands and the packaging stay true: CI runs the test command verbatim, the main-job
command ends in `convbn`, torch is pinned before convbn is installed, the wheel ships only the library, and
`import convbn` pulls in none of the tooling's optional packages."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands():
    readme = (ROOT / "README.md").read_text()
    return [c for c in re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S) if c.startswith("python3 -m venv")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one_verbatim():
    setup = _setup_commands()
    assert len(setup) == 2, setup
    run, test = setup
    assert run.endswith("&& .venv/bin/convbn") and test.endswith("&& .venv/bin/python -m pytest")
    assert test in (ROOT / ".ci" / "run").read_text()
    for cmd in setup:  # torch pinned and installed before convbn: pip never resolves torch from the range
        steps = cmd.split(" && ")
        torch_step = next(i for i, s in enumerate(steps) if re.search(r"pip install torch==\d", s))
        convbn_step = next(i for i, s in enumerate(steps) if 'install -e ".[' in s)
        assert torch_step < convbn_step, cmd


def _floor(text: str) -> tuple:
    deps = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.M | re.S).group(1)
    (dep,) = [d.strip().strip('"') for d in deps.split(",") if d.strip()]
    name, version = dep.split(">=")
    assert name == "torch"
    return tuple(int(v) for v in version.split(".")[:2])


def test_torch_floor_covers_what_the_code_uses_and_the_installed_torch_meets_it():
    import torch

    floor = _floor((ROOT / "pyproject.toml").read_text())
    uses_custom_op = any("custom_op" in p.read_text() for p in (ROOT / "src" / "convbn").rglob("*.py"))
    if uses_custom_op:
        assert floor >= (2, 4), "torch.library.custom_op needs torch 2.4; raise the floor in pyproject.toml"
    assert tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= floor


def test_import_convbn_imports_no_tooling_packages():
    code = ("import sys, convbn, convbn.bench.compare, convbn.bench.stats, convbn.cli.main, convbn.integrations; "
            "bad = sorted(m for m in ('matplotlib', 'sklearn', 'monai', 'torchvision', 'timm', 'experiments', "
            "'lightning', 'pytorch_lightning') if m in sys.modules); print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT / "tests", env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_wheel_ships_the_library_only(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("convbn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert "convbn/api.py" in modules and "convbn/cli/main.py" in modules and "convbn/bench/timing.py" in modules
    assert "convbn/ops/csrc/tune.cpp" in names and "convbn/ops/csrc/bn_fission.cpp" in names  # the kernels' sources
    assert all(n.startswith("convbn/") for n in modules), modules
    for banned in ("experiments", "models/", "mobilenet", "data.py", "results_md", "transfer", "adversarial",
                   "appendix_m", "sweep", "tests/", "benchmarks/"):
        assert not [n for n in names if banned in n], (banned, names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    import convbn

    assert f"Version: {convbn.__version__}" in text and "Requires-Dist: torch>=2.4" in text
    assert any(n.endswith("LICENSE") for n in names)
