"""Extraction benchmark: the recipe's pipeline vs featurekit vs the model-only bound, in one run.

    python benchmarks/bench_extract.py              # 48 images, batch 8 on CPU; 8000, batch 256 on CUDA
    python benchmarks/bench_extract.py --compile    # one GPU, compiled trunks (the issue's bound)
    python benchmarks/bench_extract.py --backbone timm:vit_small_patch14_dinov2   # featurekit vs a bare timm loop

For a ``timm:`` backbone the phases are (b) and (d) bare: ``timm.create_model`` and timm's own eval
transform, every image decoded and transformed to a tensor in memory first (not timed), then a
plain loop of ``model(x)`` per batch under the same precision (autocast), timed: what featurekit
costs on top of the model, decoding and store writing included. ``--model-kwargs '{"img_size": 224}'``
builds both smaller (DINOv2's 518 px is slow on a CPU).

Phases, each in its own subprocess so peak memory is its own:

(a) recipe   ImageFolder + DataLoader + fp32, one pass per backbone (every image decoded again
             for each), features gathered with torch.cat and written to HDF5 at the end (seed 003).
(b) featurekit  ``featurekit.extract`` with its defaults for the device (bf16 + nvJPEG on CUDA).
(c) bound    the same trunks prepared the same way (``prepare_trunk``), on device-resident
             tensors: forward only.
(d) decode   (``--phases decode``) featurekit's loader and views alone, no trunk: what (b) waits
             for when it is far below (c).

Also: (b) again on half the images (peak memory must not grow with the data set), and (b) in
fp32 on a subset to give the relative difference of bf16 features. All trunks use seeded random
weights (speed does not depend on the weight values). Prints a table and ratios; ``--report``
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- data


def _write_jpeg(task: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, seed, width, height = task
    rng = np.random.default_rng(seed)
    # photo-like: smooth colour fields + texture, ~25-40 KB at quality 90 like the field notes' JPEGs
    low = rng.uniform(0, 255, (height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_images(root: Path, count: int, size: tuple[int, int]) -> Path:
    tasks = []
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = int(size[0] * rng.uniform(0.75, 1.25)), int(size[1] * rng.uniform(0.75, 1.25))
        tasks.append((str(folder / f"{i:06d}.jpg"), i, width, height))
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_jpeg, tasks, chunksize=64)
    return root


# --------------------------------------------------------------------------- phases


def _device(name: str):
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def phase_recipe(args) -> dict:
    """Seed 003's method 2: one ImageFolder pass per backbone, fp32, torch.cat, HDF5 at the end."""
    import h5py
    import torch
    from torchvision import datasets

    from featurekit.backbones.trunks import load_backbone

    device = _device(args.device)
    started = time.perf_counter()
    for name in args.backbones:
        backbone = load_backbone(name, weights="random")
        model = backbone.trunk.to(device).eval()
        folder = datasets.ImageFolder(os.path.join(args.data, "train"), _recipe_transform(backbone.preprocessing))
        loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        feature_map, label_map = torch.FloatTensor(), torch.LongTensor()
        with torch.no_grad():
            for images, labels in loader:
                out = model(images.to(device))
                feature_map = torch.cat((feature_map, out.cpu()), 0)
                label_map = torch.cat((label_map, labels), 0)
        with h5py.File(os.path.join(args.scratch, f"train_feature_{name}.hd5f"), "w") as h:
            h.create_dataset("data", data=feature_map.numpy())
            h.create_dataset("label", data=label_map.numpy())
    _sync(device)
    return {"seconds": time.perf_counter() - started, "images": len(folder)}


def _recipe_transform(preprocessing):
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(preprocessing.resize_size), transforms.CenterCrop(preprocessing.crop_size),
        transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std),
    ])


def _load(name: str, args):
    from featurekit.backbones.registry import split_source
    from featurekit.backbones.trunks import load_backbone

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs and split_source(name) else None
    return load_backbone(name, weights="random", model_kwargs=kwargs)


def phase_featurekit(args) -> dict:
    import torch

    from featurekit.extraction.engine import extract
    from featurekit.extraction.settings import ExtractSettings
    from featurekit.images.decode import DecodePolicy

    device = _device(args.device)
    started = time.perf_counter()
    backbones = [_load(name, args) for name in args.backbones]
    # float32 storage: random-weight ResNet152 activations overflow float16 (real weights do not)
    settings = ExtractSettings(device=str(device), precision=args.precision, batch_size=args.batch_size,
                               num_workers=args.workers, compile=args.compile, progress=False, dtype="float32",
                               chunk_size=max(args.batch_size * 4, 512), decode=DecodePolicy(backend=args.decoder))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extract_started = time.perf_counter()
    results = extract(args.data, ["train"], backbones, args.scratch, settings)
    _sync(device)
    seconds = time.perf_counter() - started
    # extract_seconds leaves out building the models (the bound leaves it out too)
    return {"seconds": seconds, "extract_seconds": time.perf_counter() - extract_started,
            "images": results[0].rows, "stores": [str(r.path) for r in results],
            "gpu_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0}


def phase_bound(args) -> dict:
    """Forward only on device-resident inputs, the trunks prepared exactly as featurekit runs them
    (BatchNorm folded, weights in the compute precision, channels_last, compiled on request)."""
    import torch

    from featurekit.backbones.runner import prepare_trunk
    from featurekit.backbones.settings import RunSettings
    from featurekit.devices import torch_dtype

    device = _device(args.device)
    settings = RunSettings(device=str(device), precision=args.precision, compile=args.compile).resolved()
    dtype = torch_dtype(settings.precision)
    trunks, inputs = [], []
    for name in args.backbones:
        backbone = _load(name, args)
        trunks.append(prepare_trunk(backbone, settings))
        batch = torch.randn(args.batch_size, 3, *backbone.preprocessing.size, device=device)
        inputs.append(batch.contiguous(memory_format=torch.channels_last))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = max(2, args.bound_images // args.batch_size)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(2):  # warm-up: autotuning, compilation
            for trunk, x in zip(trunks, inputs):
                trunk(x)
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            for trunk, x in zip(trunks, inputs):
                trunk(x)
        _sync(device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": steps * args.batch_size}


def phase_decode(args) -> dict:
    """Decoding and views alone: featurekit's loader and, on CUDA, nvJPEG and the views cut on the GPU,
    no trunk. Where (b) is far below (c), this says whether decoding is what it waits for."""
    from featurekit.backbones.runner import device_views
    from featurekit.backbones.settings import RunSettings
    from featurekit.images.decode import DecodePolicy
    from featurekit.images.listing import list_split
    from featurekit.views.loader import ViewDataset, iterate_views

    device = _device(args.device)
    settings = RunSettings(device=str(device), batch_size=args.batch_size, num_workers=args.workers,
                           decode=DecodePolicy(backend=args.decoder)).resolved()
    preprocessings = {b.preprocessing.key: b.preprocessing for b in (_load(name, args) for name in args.backbones)}
    listing = list_split(args.data, "train")
    dataset = ViewDataset(listing.files(), list(preprocessings.values()), settings.decode)
    started, images = time.perf_counter(), 0
    for batch in iterate_views(dataset, [(0, len(listing))], settings.batch_size, settings.num_workers,
                               pin_memory=device.type == "cuda"):
        device_views(batch, device, preprocessings, settings.decode)
        images += len(batch.indices)
    _sync(device)
    return {"seconds": time.perf_counter() - started, "images": images}


def phase_bare(args) -> dict:
    """A bare timm loop over the same images, decoded and transformed to tensors first (not timed)."""
    import timm
    import torch
    from PIL import Image

    from featurekit.backbones.settings import RunSettings
    from featurekit.devices import torch_dtype

    device = _device(args.device)
    precision = RunSettings(device=str(device), precision=args.precision).resolved().precision
    dtype = torch_dtype(precision)
    [name] = args.backbones
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if "img_size" in kwargs:  # as featurekit does: timm's data config keeps its own input size otherwise
        size = kwargs["img_size"]
        kwargs["pretrained_cfg_overlay"] = {"input_size": (3, *((size, size) if isinstance(size, int) else size))}
    started = time.perf_counter()
    model = timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=0, **kwargs).eval().to(device)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    files = sorted(Path(args.data, "train").rglob("*.jpg"))
    tensors = [transform(Image.open(path).convert("RGB")) for path in files]
    batches = [torch.stack(tensors[i:i + args.batch_size]) for i in range(0, len(tensors), args.batch_size)]
    built = time.perf_counter() - started
    started = time.perf_counter()  # no warm-up batch: featurekit's first batch is timed too
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for batch in batches:
            model(batch.to(device))
    _sync(device)
    return {"seconds": time.perf_counter() - started, "images": len(files), "precision": precision,
            "build_and_decode_seconds": built}


def phase_precision(args) -> dict:
    """Relative difference of the default-precision features against fp32, on the same images."""
    from featurekit.extraction.engine import extract
    from featurekit.extraction.settings import ExtractSettings
    from featurekit.store.format import read_store

    device = _device(args.device)
    backbones = [_load(name, args) for name in args.backbones]
    out = {}
    for precision in (args.precision, "fp32"):
        settings = ExtractSettings(device=str(device), precision=precision, batch_size=args.batch_size,
                                   num_workers=args.workers, progress=False, dtype="float32")
        results = extract(args.data, ["train"], backbones, os.path.join(args.scratch, precision), settings)
        out[precision] = {Path(r.path).stem: read_store(r.path).features for r in results}
    differences = {}
    for name, reference in out["fp32"].items():
        ours = out[args.precision][name]
        relative = np.linalg.norm(ours - reference, axis=1) / np.linalg.norm(reference, axis=1)
        differences[name] = {"median": float(np.median(relative)), "max": float(relative.max())}
    resolved = ExtractSettings(device=str(device), precision=args.precision).resolved()
    return {"relative_difference": differences, "precision": resolved.precision}


PHASES = {"recipe": phase_recipe, "featurekit": phase_featurekit, "bound": phase_bound, "bare": phase_bare,
          "precision": phase_precision, "decode": phase_decode}


def run_phase(name: str, args, data: Path, scratch: Path) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--data", str(data), "--scratch", str(scratch),
               "--device", args.device, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--precision", args.precision, "--bound-images", str(args.bound_images), "--backbones", *args.backbones,
               "--model-kwargs", args.model_kwargs or "", "--decoder", args.decoder]
    if args.compile:
        command.append("--compile")
    scratch.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "worker_peak_rss_mb": round(workers, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, help="default: 48 on CPU, 8000 on CUDA")
    parser.add_argument("--size", default="400x300", help="mean JPEG size WxH of generated images")
    parser.add_argument("--data", type=Path, help="an image folder with train/ (default: generate JPEGs)")
    parser.add_argument("--backbones", "--backbone", nargs="+", default=["vgg19", "inception_v3", "resnet152"])
    parser.add_argument("--model-kwargs", help="JSON: timm.create_model arguments of a timm: backbone (both phases)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, help="default: 8 on CPU, 256 on CUDA")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--decoder", default="auto", help="featurekit decoder: auto (nvJPEG on CUDA), pil, torchvision")
    parser.add_argument("--bound-images", type=int, default=0, help="images for the bound (default: --images)")
    parser.add_argument("--precision-images", type=int, default=0,
                        help="images for the bf16/fp32 check (default: min(512, images))")
    parser.add_argument("--phases", nargs="+", help="default: recipe featurekit half bound precision; for a "
                        "timm: backbone featurekit bare")
    parser.add_argument("--report", type=Path)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.phase:  # small on a CPU, at scale on a GPU
        on_gpu = _device(args.device).type == "cuda"
        args.images = args.images or (8000 if on_gpu else 48)
        args.batch_size = args.batch_size or (256 if on_gpu else 8)
    args.bound_images = args.bound_images or args.images
    timm_backbone = len(args.backbones) == 1 and args.backbones[0].startswith("timm:")
    args.phases = args.phases or (["featurekit", "bare"] if timm_backbone else
                                  ["recipe", "featurekit", "half", "bound", "precision"])

    if args.phase:  # child process: one phase, one JSON line
        result = PHASES[args.phase](args)
        print(json.dumps({**result, **_peak_rss_mb()}))
        return

    with tempfile.TemporaryDirectory(prefix="fk-bench-") as tmp:
        tmp = Path(tmp)
        width, height = (int(v) for v in args.size.split("x"))
        started = time.perf_counter()
        data = args.data or make_images(tmp / "data", args.images, (width, height))
        generated = "" if args.data else f" generated in {time.perf_counter() - started:.1f} s"
        print(f"data: {data} ({args.images} images{generated})", flush=True)
        half = make_images(tmp / "half", args.images // 2, (width, height)) if "half" in args.phases else None
        subset = None
        if "precision" in args.phases:
            subset = make_images(tmp / "subset", args.precision_images or min(512, args.images), (width, height))
        results = {}
        for phase in args.phases:
            source = {"half": half, "precision": subset}.get(phase, data)
            results[phase] = run_phase("featurekit" if phase == "half" else phase, args, source, tmp / f"out-{phase}")
            r = results[phase]
            if "seconds" in r:
                r["images_per_s"] = r["images"] / r["seconds"]
            print(f"{phase:10s} " + json.dumps(r), flush=True)
        report(results, args)
        if args.report:
            arguments = {k: str(v) for k, v in vars(args).items()}
            args.report.write_text(json.dumps({"args": arguments, "results": results}, indent=2))


def report(results: dict, args) -> None:
    print("\n| phase | images | seconds | images/s | peak RSS MB (main / workers) | GPU peak MB |")
    print("|---|---|---|---|---|---|")
    for phase, r in results.items():
        if "seconds" not in r:
            continue
        gpu = r.get("gpu_peak_bytes", 0) / 2**20
        print(f"| {phase} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} / {r['worker_peak_rss_mb']:.0f} | {gpu:.0f} |")
    rate = {phase: r.get("images_per_s") for phase, r in results.items()}
    if rate.get("recipe") and rate.get("featurekit"):
        print(f"\nfeaturekit / recipe = {rate['featurekit'] / rate['recipe']:.2f}x")
    if rate.get("bare") and rate.get("featurekit"):
        fk = results["featurekit"]
        print(f"featurekit / bare timm loop = {fk['images'] / fk['extract_seconds'] / rate['bare']:.2f} once the "
              f"models are built ({results['bare']['precision']}; end to end, builds included: "
              f"{rate['featurekit'] / rate['bare']:.2f})")
    if rate.get("bound") and rate.get("featurekit"):
        fk = results["featurekit"]
        print(f"featurekit / model-only bound = {rate['featurekit'] / rate['bound']:.0%} end to end, "
              f"{fk['images'] / fk['extract_seconds'] / rate['bound']:.0%} once the models are built")
    if "half" in results and "featurekit" in results:
        full, half = results["featurekit"], results["half"]
        print(f"peak RSS with {full['images']} images {full['peak_rss_mb']:.0f} MB, with {half['images']} images "
              f"{half['peak_rss_mb']:.0f} MB; GPU peak {full['gpu_peak_bytes'] / 2**20:.0f} vs "
              f"{half['gpu_peak_bytes'] / 2**20:.0f} MB")
    if "precision" in results:
        p = results["precision"]
        print(f"{p['precision']} vs fp32 features, relative L2 difference per row: " +
              ", ".join(f"{name} median {d['median']:.2e} max {d['max']:.2e}"
                        for name, d in p["relative_difference"].items()))


if __name__ == "__main__":
    main()
