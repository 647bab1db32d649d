"""Real image folders and real HDF5 stores written through featurekit.store, with chosen features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurekit.images import DecodePolicy, SplitListing, list_split
from featurekit.store import Chunk, PartialStore, finalize, store_path

PREPROCESSING = {"resize_size": 8, "crop_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "antialias": True}


def make_image_folder(root: Path, split: str, counts: dict[str, int], size: int = 12) -> SplitListing:
    """``root/split/<class>/<i>.png``: small images whose colour depends on the class."""
    for class_index, (name, count) in enumerate(counts.items()):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            colour = (40 + 100 * (class_index % 3), 60 * (class_index % 4), 20 * i % 256)
            Image.new("RGB", (size, size), colour).save(folder / f"{i:03d}.png")
    return list_split(root, split)


def store_attrs(backbone: str, split: str, **overrides) -> dict:
    attrs = {"backbone": backbone, "node": "flatten", "weights": "random", "weights_sha256": "ab" * 32,
             "weights_source": "random(seed=0)", "preprocessing": PREPROCESSING, "decode": DecodePolicy().to_dict(),
             "precision": "fp32", "device": "cpu", "fingerprint": f"test-{backbone}-{split}", "split": split,
             "data_root": "test"}
    return {**attrs, **overrides}


def write_store(features_dir: Path, listing: SplitListing, store_name: str, features: np.ndarray,
                rows: int | None = None, **attr_overrides) -> Path:
    """Write ``features`` (one row per listed image) as a complete store; ``rows`` < N leaves it unfinished."""
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
