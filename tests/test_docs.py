"""Every Python example of the docs pages for recalibration and the integrations, and the README's
"Recalibrate, Lightning, FSDP2" section, runs as written (each in a fresh interpreter, in a temporary directory)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Recalibrate, Lightning, FSDP2"


def _blocks(text):
    return re.findall(r"```python\n(.+?)\n```", text, flags=re.S)


def _readme_section():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    return readme[start:end if end != -1 else None]


EXAMPLES = {
    "docs/recalibrate.md": (lambda: _blocks((ROOT / "docs/recalibrate.md").read_text()), []),
    "docs/integrations/lightning.md": (lambda: _blocks((ROOT / "docs/integrations/lightning.md").read_text()),
                                       ["lightning"]),
    "docs/integrations/fsdp.md": (lambda: _blocks((ROOT / "docs/integrations/fsdp.md").read_text()), []),
    "README.md " + SECTION: (lambda: _blocks(_readme_section()), ["lightning"]),
}


def _run(code, tmp_path, timeout=300):
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


@pytest.mark.parametrize("where", [pytest.param(w, marks=pytest.mark.slow) if "fsdp" in w else w for w in EXAMPLES])
def test_the_examples_run_as_written(where, tmp_path):
    blocks, needs = EXAMPLES[where]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the example needs `{module}`, which is not installed (pip install {module})")
    code = blocks()
    assert code, f"{where} has no ```python example"
    for i, block in enumerate(code):
        proc = _run(block, tmp_path)
        assert proc.returncode == 0, f"{where}, example {i + 1}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
