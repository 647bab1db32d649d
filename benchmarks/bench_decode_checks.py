"""What the listing and decode checks cost on real photos, and what they refuse there.

    python benchmarks/bench_decode_checks.py DATA_ROOT [--split train] [--limit 2000]

Measured in one run, on the same files:

- listing: ``list_split`` (its own walk: loop detection, special files, reports) against a bare
  ``os.walk`` that only collects the image names (the lower bound of any listing);
- decoding: ``decode_image`` with every refusal on (the default policy) against the same policy
  with ``refuse_damaged_jpeg=False``, i.e. the cost of re-reading each JPEG's entropy-coded data
  with libjpeg-turbo to hear its warnings; and ``jpeg_damage`` alone;
- refusals: how many of the files each check refuses, with the reasons.

Prints a table and ratios; ``--report`` writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurekit.errors import ImageDecodeError  # noqa: E402
from featurekit.images.decode import DecodePolicy, decode_image, jpeg_damage  # noqa: E402
from featurekit.images.listing import IMAGE_EXTENSIONS, list_split  # noqa: E402


def bare_walk(split_dir: Path) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(split_dir) for n in names
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_all(files: list[str], policy: DecodePolicy) -> tuple[float, collections.Counter]:
    refused: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for path in files:
        try:
            decode_image(path, policy)
        except ImageDecodeError as error:
            refused[error.reason.split(" (")[0]] += 1
    return time.perf_counter() - start, refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=2000, help="images decoded (listing always covers all)")
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)

    listing = list_split(args.data_root, args.split)
    walk_s = best_of(3, lambda: bare_walk(listing.split_dir))
    list_s = best_of(3, lambda: list_split(args.data_root, args.split))
    files = [path for path, _ in listing.files()][: args.limit]
    jpegs = [path for path in files if path.lower().endswith((".jpg", ".jpeg"))]
    datas = [Path(path).read_bytes() for path in jpegs]

    checked_s, refused = decode_all(files, DecodePolicy())
    unchecked_s, refused_unchecked = decode_all(files, dataclasses.replace(DecodePolicy(), refuse_damaged_jpeg=False))
    start = time.perf_counter()
    damaged = [path for path, data in zip(jpegs, datas) if jpeg_damage(data)]
    check_s = time.perf_counter() - start

    report = {
        "data": str(listing.split_dir), "listed": len(listing), "decoded": len(files), "jpegs": len(jpegs),
        "list_split_s": list_s, "bare_walk_s": walk_s, "list_ratio": list_s / walk_s,
        "decode_checked_s": checked_s, "decode_unchecked_s": unchecked_s, "decode_ratio": checked_s / unchecked_s,
        "jpeg_damage_ms_per_jpeg": 1000 * check_s / max(1, len(jpegs)),
        "decode_unchecked_ms_per_image": 1000 * unchecked_s / max(1, len(files)),
        "refused": dict(refused), "refused_without_jpeg_check": dict(refused_unchecked), "damaged_jpegs": damaged,
        "notices": listing.notices(),
    }
    print(f"{report['data']}: {len(listing)} images listed, {len(files)} decoded ({len(jpegs)} JPEGs)")
    print(f"  listing   list_split {list_s * 1000:8.1f} ms   bare os.walk {walk_s * 1000:8.1f} ms   "
          f"ratio {report['list_ratio']:.2f}")
    print(f"  decoding  checked {checked_s:8.2f} s   without the JPEG check {unchecked_s:8.2f} s   "
          f"ratio {report['decode_ratio']:.2f}")
    print(f"  jpeg_damage alone {report['jpeg_damage_ms_per_jpeg']:.2f} ms per JPEG "
          f"(decode_image {report['decode_unchecked_ms_per_image']:.2f} ms per image without it)")
    print(f"  refused: {dict(refused) or 'none'}; damaged JPEGs: {damaged or 'none'}")
    for line in listing.notices():
        print(f"  notice: {line}")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
