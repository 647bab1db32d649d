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


# --------------------------------------------------------------------------- feature stores with chosen features

STORE_PREPROCESSING = {"resize_size": 8, "crop_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "antialias": True}


def make_image_folder(root: Path, split: str, counts: dict[str, int]) -> "SplitListing":
    """``root/split/<class>/img_NN.jpg`` (``write_image_folder``), listed by the real lister."""
    from featurekit.images import list_split

    write_image_folder(root, {split: counts})
    return list_split(root, split)


def store_attrs(backbone: str, split: str, **overrides) -> dict:
    from featurekit.images import DecodePolicy

    attrs = {"backbone": backbone, "node": "flatten", "weights": "random", "weights_sha256": "ab" * 32,
             "weights_source": "random(seed=0)", "preprocessing": STORE_PREPROCESSING, "decode": DecodePolicy().to_dict(),
             "precision": "fp32", "device": "cpu", "fingerprint": f"test-{backbone}-{split}", "split": split,
             "data_root": "test"}
    return {**attrs, **overrides}


def write_store(features_dir: Path, listing, store_name: str, features: np.ndarray,
                rows: int | None = None, **attr_overrides) -> Path:
    """Write ``features`` (one row per listed image) through the real store writer; ``rows`` < N leaves it unfinished."""
    from featurekit.store import Chunk, PartialStore, finalize, store_path

    final = store_path(features_dir, listing.split, store_name)
    final.parent.mkdir(parents=True, exist_ok=True)
    attrs = store_attrs(store_name, listing.split, **attr_overrides)
    partial = PartialStore(final, attrs["fingerprint"])
    partial.open()
    stop = len(listing) if rows is None else rows
    partial.write(Chunk(0, stop, np.arange(stop, dtype=np.int64), features[:stop].astype(np.float32)))
    if rows is None:
        finalize(partial, listing, attrs)
    return final


def blobs(labels: np.ndarray, dim: int, seed: int, spread: float = 0.3) -> np.ndarray:
    """float32[N, dim]: one well separated Gaussian cluster per label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(labels.max()) + 1, dim)) * 3
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)


@pytest.fixture
def two_backbone_features(tmp_path: Path):
    """A 3-class train/valid image folder and stores of backbones ``a`` (dim 6) and ``b`` (dim 4)."""
    root, features_dir = tmp_path / "data", tmp_path / "features"
    for split, count in (("train", 8), ("valid", 4)):
        listing = make_image_folder(root, split, {"ant": count, "bee": count, "wasp": count})
        labels = np.array([r.label for r in listing.records])
        write_store(features_dir, listing, "a", blobs(labels, 6, seed=1) + np.arange(len(labels))[:, None] * 1e-3)
        write_store(features_dir, listing, "b", blobs(labels, 4, seed=2))
    return root, features_dir
