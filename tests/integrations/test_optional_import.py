"""The integration modules import without their framework; asking for the callback then says what to install."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,package", [("lightning", "lightning"), ("pytorch_lightning", "pytorch_lightning")])
def test_a_missing_framework_gives_an_import_error_that_says_what_to_install(module, package):
    code = (f"import sys; sys.modules[{package!r}] = None; sys.modules['lightning.pytorch'] = None\n"
            f"import convbn.integrations.{module} as m\n"
            "try:\n    m.ConvBNCallback\nexcept ImportError as e:\n    print('ImportError:', e)\n"
            f"try:\n    from convbn.integrations.{module} import ConvBNCallback\n"
            "except ImportError as e:\n    print('from-import:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"needs the `{package}` package" in proc.stdout and f"pip install {package}" in proc.stdout, proc.stdout
    assert "from-import:" in proc.stdout, proc.stdout
