"""Augmented feature caches and test-time augmentation, measured on a real data set with real weights.

    python benchmarks/bench_augment.py --data ../shared/data/hymenoptera --work /tmp/bench_augment/hymenoptera
    python benchmarks/bench_augment.py --data ../shared/data/caltech101 --work /tmp/bench_augment/caltech101 \\
        --per-class 10                      # the first 10 images of each class of each split, copied

Phase ``extract`` (each run ``featurekit.extraction.extract_listings``, what ``featurekit extract``
runs, with its defaults for the CPU, in this one process with the backbones built once, timed by the
wall clock: the ratios compare the extraction alone, without imports and model loading):

- train: plain (K = 0), ``--augment 4`` and ``--augment 8`` (policy ``standard``, seed 0), and
  ``--augment 8 --augment-policy crop-flip``;
- valid: plain, ``--tta flip`` and ``--tta five-crop``;
- and, without trunks, the seconds of one PIL decode of every train image and of cutting the plain
  and K views from it for both backbones' preprocessings (one process, one thread).

Goal: K views cost at most (K + 1)x the trunk time plus one decode per image. The trunk time is
taken as the plain extraction's time less the decoding time (a lower bound when the loader worker
decodes while the trunks run), so ``bound = (K + 1) (T_plain - T_decode) + T_decode`` is strict.
The K = 4 views must be the K = 8 store's first four views, bit for bit (checked).

Phase ``heads``: ``train_head`` on lite0 + lite2 (concatenated) for each train store, MLP over five
seeds and logreg (deterministic: one run), selection on the plain valid features; valid accuracy
plain and with flip and five-crop test-time augmentation. Mean and spread (population std, min,
max) over the seeds. Everything lands in ``WORK/results.json``; the table prints at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import featurekit  # noqa: E402,F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np  # noqa: E402

BACKBONES = ["efficientnet_lite0", "efficientnet_lite2"]
# train stores: name -> (K, policy); K8-crop-flip: the same K without the photometric ops, which cost CPU time
ARMS = {"K0": (0, "standard"), "K4": (4, "standard"), "K8": (8, "standard"), "K8-crop-flip": (8, "crop-flip")}
TTA_MODES = ("none", "flip", "five-crop")
SEEDS = (0, 1, 2, 3, 4)


# --------------------------------------------------------------------------- data


def subset(data: Path, work: Path, per_class: int) -> Path:
    """The first ``per_class`` images (listing order) of each class of train and valid, copied with their mtimes."""
    from featurekit.images.listing import list_split

    target = work / "data"
    if (target / "COMPLETE").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for split in ("train", "valid"):
        listing = list_split(data, split)
        taken: dict[int, int] = {}
        for record in listing.records:
            if taken.get(record.label, 0) < per_class:
                taken[record.label] = taken.get(record.label, 0) + 1
                destination = target / split / record.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(listing.split_dir / record.path, destination)
    (target / "COMPLETE").write_text(f"first {per_class} images per class of {data}\n")
    return target


# --------------------------------------------------------------------------- extraction


def extract(data: Path, out: Path, split: str, plan, backbones) -> dict:
    """One extraction of ``split`` under the view ``plan``; its wall time and the command that does the same."""
    from featurekit.extraction.engine import extract_listings
    from featurekit.extraction.settings import ExtractSettings
    from featurekit.images.listing import list_split

    listing = list_split(data, split)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    results = extract_listings([listing], backbones, out, ExtractSettings(progress=False, views=plan), lambda _: None)
    seconds = time.perf_counter() - start
    if any(result.status != "written" or result.computed != len(listing) for result in results):
        raise SystemExit(f"{out}: already (partly) extracted, no time measured; delete it to measure again")
    options = ([f"--augment {plan.augment} --augment-policy {plan.policy}"] if plan.augment else []) + \
        ([f"--tta {plan.tta}"] if plan.tta != "none" else [])
    command = " ".join(["featurekit extract", str(data), "--split", split, "--backbone", *BACKBONES,
                        "--weights IMAGENET --out", str(out), *options])
    return {"seconds": seconds, "images": len(listing), "load_before": load, "load_after": os.getloadavg()[0],
            "command": command}


def decode_and_view_seconds(data: Path, limit: int) -> dict:
    """Seconds per image, without trunks: one PIL decode; decode + plain view; decode + the plain
    view and K augmented views, for both backbones' preprocessings."""
    import torch

    from featurekit.backbones.trunks import load_backbone
    from featurekit.images.decode import DecodePolicy, decode_image
    from featurekit.images.listing import list_split
    from featurekit.views.augment import ViewPlan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = [path for path, _ in list_split(data, "train").files()][:limit]
    preprocessings = {b.preprocessing.key: b.preprocessing for b in (load_backbone(n, "IMAGENET") for n in BACKBONES)}
    policy = DecodePolicy(backend="pil")
    result = {"images": len(paths)}
    start = time.perf_counter()
    for path in paths:
        decode_image(path, policy)
    result["decode"] = (time.perf_counter() - start) / len(paths)
    for name, (k, augment_policy) in ARMS.items():
        plan = ViewPlan(augment=k, policy=augment_policy)
        start = time.perf_counter()
        for index, path in enumerate(paths):
            image = decode_image(path, policy)
            for preprocessing in preprocessings.values():
                plan.views(image, preprocessing, index)
        result[f"decode_and_views_{name}"] = (time.perf_counter() - start) / len(paths)
    torch.set_num_threads(threads)
    return result


def extract_phase(data: Path, work: Path, results: dict) -> None:
    from featurekit.backbones.trunks import load_backbone
    from featurekit.views.augment import ViewPlan

    backbones = [load_backbone(name, "IMAGENET") for name in BACKBONES]
    timings = results.setdefault("extract", {})
    runs = [(f"train-{name}", "train", ViewPlan(augment=k, policy=policy)) for name, (k, policy) in ARMS.items()]
    runs += [(f"valid-{mode}", "valid", ViewPlan(tta=mode)) for mode in TTA_MODES]
    for key, split, plan in runs:
        if key not in timings:
            timings[key] = extract(data, work / key, split, plan, backbones)
            save(work, results)
        print(f"{key}: {timings[key]['seconds']:.1f} s ({timings[key]['images']} images, load average "
              f"{timings[key]['load_before']:.2f} -> {timings[key]['load_after']:.2f})", flush=True)
    if "cpu" not in results:
        results["cpu"] = decode_and_view_seconds(data, limit=200)
        save(work, results)
    if {"K0", "K4", "K8"} <= set(ARMS):
        results["checks"] = consistency(work)
        save(work, results)


def consistency(work: Path) -> dict:
    """The K = 4 views are the K = 8 store's first four; every store's plain rows are the plain store's."""
    from featurekit.store.format import read_store

    checks = {}
    for name in BACKBONES:
        plain = {split: read_store(work / f"{split}-{'K0' if split == 'train' else 'none'}" / split / f"{name}.h5")
                 for split in ("train", "valid")}
        four, eight = (read_store(work / f"train-K{k}" / "train" / f"{name}.h5") for k in (4, 8))
        checks[name] = {
            "K4_views_equal_K8_first_four": bool(np.array_equal(four.views["features_aug"],
                                                                eight.views["features_aug"][:, :4])),
            "plain_rows_equal_across_train_stores": all(np.array_equal(s.features, plain["train"].features)
                                                        for s in (four, eight)),
            "plain_rows_equal_across_valid_stores": all(np.array_equal(
                read_store(work / f"valid-{mode}" / "valid" / f"{name}.h5").features, plain["valid"].features)
                for mode in TTA_MODES[1:]),
        }
    return checks


# --------------------------------------------------------------------------- heads


def arm(work: Path, name: str, mode: str) -> Path:
    """A features folder of the train stores ``name`` (ARMS) and the valid stores with test-time views ``mode``."""
    folder = work / "arms" / f"{name}-{mode}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", work / f"train-{name}" / "train"), ("valid", work / f"valid-{mode}" / "valid")):
        link = folder / split
        if not link.is_symlink():
            link.symlink_to(source)
    return folder


def heads_phase(work: Path, results: dict) -> None:
    from featurekit.heads.head_file import HEAD_FILE, load_head
    from featurekit.heads.train import map_by_name, test_time_metrics, train_head
    from featurekit.store.dataset import load_features
    from featurekit.store.layout import TEST_TIME

    runs = results.setdefault("heads", {})
    for name in ARMS:
        if not (work / f"train-{name}").is_dir():
            continue
        features_dir = arm(work, name, "flip")
        five_crop = arm(work, name, "five-crop")
        train = load_features(features_dir, "train", BACKBONES)
        valid = load_features(five_crop, "valid", BACKBONES, views=[TEST_TIME])
        for head_kind, seeds in (("mlp", SEEDS), ("logreg", (None,))):
            for seed in seeds:
                key = f"{name}-{head_kind}" + (f"-seed{seed}" if seed is not None else "")
                if key in runs:
                    continue
                out = work / "heads" / key
                start = time.perf_counter()
                report = train_head(features_dir, BACKBONES, head_kind, out, params={} if seed is None else
                                    {"seed": seed}, plots=False, tta="flip")
                head, _ = load_head(out / HEAD_FILE)
                five = test_time_metrics(head, map_by_name(valid, train), valid.views[TEST_TIME], train.classes)
                runs[key] = {"valid": report["valid"]["accuracy"], "flip": report["valid_tta"]["accuracy"],
                             "five-crop": five["accuracy"], "chosen": report["chosen"],
                             "train_rows": report["train"]["rows_fitted"], "seconds": time.perf_counter() - start}
                save(work, results)
                print(f"{key}: valid {runs[key]['valid']:.4f}, flip {runs[key]['flip']:.4f}, five-crop "
                      f"{runs[key]['five-crop']:.4f} ({runs[key]['seconds']:.0f} s)", flush=True)


# --------------------------------------------------------------------------- report


def save(work: Path, results: dict) -> None:
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def summary(results: dict) -> None:
    timings, cpu = results.get("extract", {}), results.get("cpu")
    if timings:
        plain = timings["train-K0"]["seconds"]
        decode = cpu["decode"] * results["train_images"] if cpu else 0.0
        print(f"\nextraction of {results['train_images']} train images, {' + '.join(BACKBONES)} "
              f"(one decode: {decode:.1f} s serial)")
        print("| train store | seconds | x plain | K + 1 | bound (K+1)(T0-Tdecode)+Tdecode | within bound |")
        print("|---|---|---|---|---|---|")
        for name, (k, _) in ARMS.items():
            if f"train-{name}" not in timings:
                continue
            seconds = timings[f"train-{name}"]["seconds"]
            bound = (k + 1) * (plain - decode) + decode
            print(f"| {name} | {seconds:.1f} | {seconds / plain:.2f} | {k + 1} | {bound:.1f} | "
                  f"{'yes' if seconds <= bound else 'no'} |")
        valid_plain = timings["valid-none"]["seconds"]
        for mode in TTA_MODES[1:]:
            seconds = timings[f"valid-{mode}"]["seconds"]
            print(f"valid --tta {mode}: {seconds:.1f} s, {seconds / valid_plain:.2f}x the plain valid extraction")
    if cpu:
        print(f"per image without trunks ({cpu['images']} images, one thread): decode {1e3 * cpu['decode']:.1f} ms; "
              + ", ".join(f"decode + views {name} {1e3 * cpu[f'decode_and_views_{name}']:.1f} ms"
                          for name in ARMS if f"decode_and_views_{name}" in cpu))
    if results.get("checks"):
        print(f"checks: {json.dumps(results['checks'])}")
    runs = results.get("heads", {})
    if runs:
        print("\n| train store | head | valid | + flip TTA | + five-crop TTA | seeds |")
        print("|---|---|---|---|---|---|")
        for name in ARMS:
            for head_kind in ("mlp", "logreg"):
                chosen = [run for key, run in runs.items() if key.startswith(f"{name}-{head_kind}")]
                if chosen:
                    cells = [spread([run[column] for run in chosen]) for column in ("valid", "flip", "five-crop")]
                    print(f"| {name} | {head_kind} | {' | '.join(cells)} | {len(chosen)} |")


def spread(values: list[float]) -> str:
    values = 100 * np.asarray(values)
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std():.2f} ({values.min():.2f}-{values.max():.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="root/<split>/<class>/<image>")
    parser.add_argument("--work", type=Path, required=True, help="stores, heads and results.json go here")
    parser.add_argument("--per-class", type=int, help="use only the first N images of each class of each split")
    parser.add_argument("--phase", choices=["extract", "heads", "all", "report"], default="all")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="train stores to extract and train on (K0, the plain one, is always kept)")
    args = parser.parse_args()
    for name in set(ARMS) - {"K0", *args.arms}:  # a smaller run on a big set: fewer train stores
        del ARMS[name]
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    data = subset(args.data, args.work, args.per_class) if args.per_class else args.data
    if "train_images" not in results:
        from featurekit.images.listing import list_split

        results.update(data=str(data), source=str(args.data), per_class=args.per_class,
                       train_images=len(list_split(data, "train")), valid_images=len(list_split(data, "valid")))
    if args.phase in ("extract", "all"):
        extract_phase(data, args.work, results)
    if args.phase in ("heads", "all"):
        heads_phase(args.work, results)
    summary(results)


if __name__ == "__main__":
    main()
