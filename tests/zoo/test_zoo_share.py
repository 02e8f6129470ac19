"""Zoo-wide: >= 99% of the norm layers that follow a Conv/Linear are converted in tune (issue 12's
"Done when"). Uses the counts test_zoo.py recorded; computes the ones it did not (e.g. under -k)."""

from __future__ import annotations

import warnings

import pytest
import torch

import convbn

from .conftest import ZOO_TABLE, record
from .models import ZOO, layer_followed_norms, norm_modules

pytestmark = pytest.mark.slow

SHARE = 0.99


def _counts(case) -> dict:
    row = ZOO_TABLE.setdefault(case.name, {})
    if "converted_after_layer" in row:
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = case.model()
    args = case.train_args(torch.float64)
    after_layer = layer_followed_norms(model, args, seed=1234)
    try:
        convbn.convert(model, "tune", example_inputs=args)
        rows = {r.bn: r for r in convbn.report(model).rows}
    except Exception as e:  # noqa: BLE001 - a model convbn cannot convert converts nothing
        rows, row["error"] = {}, f"{type(e).__name__}: {e}"
    record(case, norms=len(norm_modules(model)), after_layer=sum(v is not None for v in after_layer.values()),
           converted_after_layer=sum(1 for n, layer in after_layer.items()
                                     if layer is not None and n in rows and rows[n].status == "converted"))
    return ZOO_TABLE[case.name]


def test_zoo_converts_99_percent_of_norm_layers_after_a_layer() -> None:
    cases = [c for c in ZOO if not c.unavailable]
    if not cases:
        pytest.skip(f"{ZOO[0].unavailable}: the zoo runs in the torch 2.14.1 + torchvision + timm leg")
    per_model = []
    total = conv = 0
    for case in cases:
        row = _counts(case)
        total += row["after_layer"]
        conv += row["converted_after_layer"]
        per_model.append(f"{case.name}: {row['converted_after_layer']}/{row['after_layer']}"
                         + (f" ({row['error'][:80]})" if "error" in row else ""))
    share = conv / total
    assert share >= SHARE, (f"{conv} of {total} norm layers that follow a Conv/Linear are converted in tune "
                            f"({share:.1%} < {SHARE:.0%}) over {len(cases)} models:\n  " + "\n  ".join(per_model))
