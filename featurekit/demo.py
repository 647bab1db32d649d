"""The embedded default data set: scikit-learn's handwritten digits as an image folder.

``python -m featurekit.demo --out data/digits`` writes ``train/<digit>/*.png`` and
``valid/<digit>/*.png``: a class-balanced subset of the 1,797 bundled 8x8 scans, upscaled to
64x64 grayscale PNGs (they also exercise the grayscale -> RGB path). Works offline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: str | Path, train_per_class: int = 30, valid_per_class: int = 15, seed: int = 0) -> Path:
    """Write the folder (idempotent: the same files every time). Returns ``out``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = Path(out)
    for label in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        chosen = {"train": members[:train_per_class],
                  "valid": members[train_per_class:train_per_class + valid_per_class]}
        for split, indices in chosen.items():
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
                image = Image.fromarray(pixels, "L").resize((64, 64), Image.Resampling.BICUBIC)
                target = folder / f"digit_{index:04d}.png"
                if not target.exists():
                    image.save(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits")
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--valid-per-class", type=int, default=15)
    args = parser.parse_args()
    out = write_digits(args.out, args.train_per_class, args.valid_per_class)
    counts = {split: sum(1 for _ in (out / split).rglob("*.png")) for split in ("train", "valid")}
    print(f"{out}: {counts['train']} train and {counts['valid']} valid images of 10 digit classes")


if __name__ == "__main__":
    main()
