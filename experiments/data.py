"""A small real image dataset that needs no download: scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["load_digits_dataset"]


def load_digits_dataset(image_size: int = 32, channels: int = 3, seed: int = 0,
                        test_fraction: float = 0.25
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 grey 8x8 images, 10 classes) as image tensors for CNNs.

    Pixels (0..16) are scaled to [0, 1], resized bilinearly to ``image_size`` x ``image_size``,
    standardised with the mean and std of the *training* split (one scalar each, so no test
    information leaks), and replicated to ``channels`` channels. The split is stratified by class
    and fixed by ``seed``.

    Args:
        image_size: output height and width (>= 1).
        channels: channels per image (>= 1); 3 suits ImageNet-style models.
        seed: seed of the train/test split.
        test_fraction: share of samples in the test split, in (0, 1).

    Returns:
        ``(train_x, train_y, test_x, test_y)``: float32 images ``(N, channels, image_size,
        image_size)`` and int64 labels ``(N,)``.

    Example:
        >>> train_x, train_y, test_x, test_y = load_digits_dataset(image_size=16, channels=1)
        >>> tuple(train_x.shape), tuple(test_x.shape), int(train_y.max())
        ((1347, 1, 16, 16), (450, 1, 16, 16), 9)
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}.")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an int >= 1, got {channels!r}.")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}.")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError(
            "load_digits_dataset needs scikit-learn, which is not installed. "
            "Install it with `pip install scikit-learn` (or `pip install convbn[bench]`)."
        ) from None

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=float(test_fraction), random_state=seed,
        stratify=labels.numpy(),
    )
    x = images.unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_idx_t, test_idx_t = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean, std = x[train_idx_t].mean(), x[train_idx_t].std()
    x = ((x - mean) / std).repeat(1, channels, 1, 1).contiguous()
    return x[train_idx_t], labels[train_idx_t], x[test_idx_t], labels[test_idx_t]
