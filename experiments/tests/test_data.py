"""Tests for the offline digits dataset."""

from __future__ import annotations

import builtins
import doctest
from typing import Any

import pytest
import torch

pytest.importorskip("sklearn")  # an optional dependency (the bench extra)

import experiments.data as data_mod  # noqa: E402
from experiments.data import load_digits_dataset  # noqa: E402


def test_docstring_example_runs() -> None:
    result = doctest.testmod(data_mod)
    assert result.attempted >= 2 and result.failed == 0


def test_shapes_dtypes_normalisation_and_channels() -> None:
    train_x, train_y, test_x, test_y = load_digits_dataset(image_size=32, channels=3)
    assert train_x.shape == (1347, 3, 32, 32) and test_x.shape == (450, 3, 32, 32)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert len(train_y) + len(test_y) == 1797
    # standardised with the training split's statistics
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-3
    torch.testing.assert_close(train_x[:, 0], train_x[:, 2])  # replicated channels
    assert train_x.is_contiguous()
    assert not torch.equal(train_x[0], train_x[1])


def test_split_is_stratified_fixed_by_seed_and_disjoint() -> None:
    a = load_digits_dataset(image_size=8, channels=1, seed=0)
    b = load_digits_dataset(image_size=8, channels=1, seed=0)
    c = load_digits_dataset(image_size=8, channels=1, seed=1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])
    train_counts = torch.bincount(a[1], minlength=10).float()
    test_counts = torch.bincount(a[3], minlength=10).float()
    assert ((test_counts / (train_counts + test_counts)) - 0.25).abs().max() < 0.02
    # no image appears in both splits (digits has no exact duplicates across train/test here)
    train_flat, test_flat = a[0].flatten(1), a[2].flatten(1)
    assert torch.cdist(test_flat, train_flat).min() > 0


def test_resize_preserves_image_content() -> None:
    small = load_digits_dataset(image_size=8, channels=1)[0]
    big = load_digits_dataset(image_size=32, channels=1)[0]
    # downsampling the 32x32 back to 8x8 by 4x4 averaging stays close to the original (after
    # each one's own standardisation, so compare correlations)
    back = torch.nn.functional.avg_pool2d(big, 4)
    corr = torch.corrcoef(torch.stack([back.flatten(), small.flatten()]))[0, 1]
    assert corr > 0.95


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 0}, "image_size must be an int >= 1"),
    ({"channels": 0}, "channels must be an int >= 1"),
    ({"test_fraction": 1.0}, "strictly between 0 and 1"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_digits_dataset(**kwargs)


def test_missing_sklearn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_dataset()
