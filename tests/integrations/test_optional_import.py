"""The integration modules import without their framework; asking for the callback then says what to install.
(That `import convbn` imports no framework is checked in tests/test_readme.py.)"""

import subprocess
import sys

CODE = """
import sys
for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):
    sys.modules[name] = None  # as if not installed: importing them raises ImportError
import convbn.integrations.lightning as a, convbn.integrations.pytorch_lightning as b
for m in (a, b):
    try:
        m.ConvBNCallback
    except ImportError as e:
        print('ImportError:', e)
try:
    from convbn.integrations.lightning import ConvBNCallback
except ImportError as e:
    print('from-import:', e)
"""


def test_a_missing_framework_gives_an_import_error_that_says_what_to_install():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for package in ("lightning", "pytorch_lightning"):
        assert f"needs the `{package}` package" in proc.stdout and f"pip install {package} " in proc.stdout, proc.stdout
    assert "from-import:" in proc.stdout, proc.stdout
