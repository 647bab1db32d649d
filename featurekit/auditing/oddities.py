"""Files whose decode was odd, and class balance: what the audit says without the features.

- decode: palette images (GIF and PNG in mode P: web placeholders, clip art), images with more than
  one frame (an animated GIF: only its first is seen), tiny images (shorter side below ``tiny``
  pixels), read from each file's header (a few bytes, no decode), and the files extraction skipped,
  with the reasons the stores recorded;
- balance: rows per class per split, classes missing from a split or under 10 rows, the
  largest / smallest ratio, and classes whose share of a split differs from the first split's by more than 2x.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ..images.decode import ImageSource, open_image

__all__ = ["class_balance", "header_oddities"]

SMALL_CLASS = 10  # rows: a class under this is listed


def header_oddities(sources: Sequence[ImageSource], tiny: int, workers: int = 4) -> list[tuple[int, str]]:
    """(row, what is odd) of every row whose file header shows a palette, several frames, or a side < ``tiny``."""
    # PIL's warnings (large images, palette transparency) silenced here, once, by this thread: a
    # catch_warnings per worker thread restores the filters out of order and left "ignore" behind
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore")
        found = list(pool.map(lambda source: _odd(source, tiny), sources, chunksize=64))
    return [(row, odd) for row, odd in enumerate(found) if odd]


def _odd(source: ImageSource, tiny: int) -> str:
    try:
        with open_image(source) as handle, Image.open(handle) as image:
            width, height = image.size
            said = [f"palette {image.format}" if image.mode in ("P", "PA") else "",
                    f"{image.n_frames} frames" if getattr(image, "n_frames", 1) > 1 else "",
                    f"tiny ({width}x{height})" if min(width, height) < tiny else ""]
    except Exception:  # noqa: BLE001 - PIL raises many types; a file changed or gone since is not a decode oddity
        return ""
    return ", ".join(filter(None, said))


def class_balance(labels_by_split: Mapping[str, np.ndarray], classes: Sequence[str]) -> dict:
    """Per split: ``counts`` (class -> rows), ``missing``, ``small`` (under 10 rows), ``ratio`` (largest /
    smallest present class), and ``shifted``: classes whose share differs more than 2x from the first split's."""
    splits = list(labels_by_split)
    counts = {s: np.bincount(labels_by_split[s], minlength=len(classes)) for s in splits}
    reference = counts[splits[0]] / max(1, counts[splits[0]].sum())
    out = {}
    for split in splits:
        c = counts[split]
        present = c[c > 0]
        share = c / max(1, c.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = share / reference
        shifted = np.flatnonzero((reference > 0) & ((ratio > 2) | (ratio < 0.5))) if split != splits[0] else []
        out[split] = {"rows": int(c.sum()), "counts": {name: int(n) for name, n in zip(classes, c)},
                      "missing": [classes[j] for j in np.flatnonzero(c == 0)],
                      "small": {classes[j]: int(c[j]) for j in np.flatnonzero((c > 0) & (c < SMALL_CLASS))},
                      "ratio": float(present.max() / present.min()) if len(present) else None,
                      "shifted": {classes[j]: [round(float(share[j]), 4), round(float(reference[j]), 4)]
                                  for j in shifted}}
    return out
