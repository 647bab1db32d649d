"""Shared fixtures: tiny real image folders written with PIL (the tests never read ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, layout: dict[str, dict[str, int]], seed: int = 0, size: tuple[int, int] = (40, 52)) -> Path:
    """``layout[split][class] = count`` JPEGs of varied sizes around ``size`` (h, w)."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for class_name, count in classes.items():
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = size[0] + 3 * i, size[1] + 5 * (i % 3)
                # smooth gradients + noise: JPEG-friendly, distinct per image
                base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
                pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """train: 2 classes x 3 images, valid: 2 classes x 2 images."""
    return write_image_folder(tmp_path / "data", {"train": {"cat": 3, "dog": 3}, "valid": {"cat": 2, "dog": 2}})
