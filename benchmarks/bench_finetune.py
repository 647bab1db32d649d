"""finetune's training step vs a bare torch training loop of the same model, batch and precision.

finetune's side is its own step (:func:`featurekit.finetune_train.train_step` on a
:class:`~featurekit.finetune_model.FinetuneModel` built from a logistic-regression head, AdamW
groups from :func:`~featurekit.finetune_train.parameter_groups`, the learning rate set per step as
in training): uint8 views in, the weights' normalisation, the trunk (frozen part folded and cast,
unfrozen part trained, BatchNorm frozen), rounding to the store's dtype, the head's scaler and
Linear, NLL loss. The bare side: the same architecture and weights as torchvision's feature
extractor gives it, the same parameters trainable, eval-mode BatchNorm, a Linear, cross-entropy,
AdamW, fed images already normalised (so it does strictly less work). Both use the same autocast
precision and memory format and one fixed random batch (no data loading: the step alone). Rounds
alternate between the two, and each side's best round is kept, which is robust to other processes
on a shared machine. Goal: ratio (bare / finetune images/s) within 1.2.

    python benchmarks/bench_finetune.py                       # efficientnet_lite0, from _blocks.15, batch 16
    python benchmarks/bench_finetune.py --backbone resnet18 --unfreeze layer4 --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurekit.backbones.trunks import load_backbone
from featurekit.devices import PRECISIONS
from featurekit.finetuning.loop import parameter_groups, train_step
from featurekit.finetuning.model import FinetuneModel, head_layers, unfrozen_part
from featurekit.finetuning.settings import FinetuneSettings
from featurekit.heads.linear import LogisticHead


def finetune_side(args, settings: FinetuneSettings, images: torch.Tensor, targets: torch.Tensor):
    backbone = load_backbone(args.backbone, "random")
    features = np.random.default_rng(0).normal(size=(64, backbone.feature_dim)).astype(np.float32)
    head = LogisticHead(C=1.0).fit(features, np.arange(64) % args.classes)
    _, layers = head_layers(head, "benchmark head")
    model = FinetuneModel([backbone], layers, {backbone.store_name: args.unfreeze}, settings.precision, "float16",
                          channels_last=True).to(settings.device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.lr)
    views = {backbone.preprocessing.key: images}

    def step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"]
        train_step(model, optimizer, views, targets)

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def bare_side(args, settings: FinetuneSettings, images: torch.Tensor, targets: torch.Tensor):
    backbone = load_backbone(args.backbone, "random")
    trunk = backbone.trunk
    trainable = unfrozen_part(trunk.body, args.unfreeze, backbone.store_name).parameters
    for name, parameter in trunk.body.named_parameters():
        parameter.requires_grad_(name in trainable)
    model = nn.Sequential(trunk, nn.Linear(backbone.feature_dim, args.classes)).to(settings.device)
    model.to(memory_format=torch.channels_last).eval()  # eval: BatchNorm statistics frozen, as finetune's default
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    inputs = backbone.preprocessing.normalize(images).contiguous(memory_format=torch.channels_last)
    dtype = PRECISIONS[settings.precision]

    def step() -> None:
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def timed(step, steps: int, device: str) -> float:
    """Seconds for ``steps`` steps, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--unfreeze", default="_blocks.15", help="first trainable module (none, all, a module path)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side, alternating")
    args = parser.parse_args()
    settings = FinetuneSettings(device=args.device, precision=args.precision, batch_size=args.batch_size,
                                num_workers=0).resolved()
    generator = torch.Generator().manual_seed(0)
    crop = load_backbone(args.backbone, "random").preprocessing.crop_size
    images = torch.randint(0, 256, (args.batch_size, 3, crop, crop), dtype=torch.uint8, generator=generator)
    images = images.to(settings.device)
    targets = (torch.arange(args.batch_size) % args.classes).to(settings.device)
    sides = {"finetune": finetune_side(args, settings, images, targets), "bare": bare_side(args, settings, images,
                                                                                           targets)}
    print(f"{args.backbone} from {args.unfreeze}, batch {args.batch_size}, {settings.device}, {settings.precision}, "
          f"threads {torch.get_num_threads()}; trainable parameters: "
          + ", ".join(f"{name} {count:,}" for name, (_, count) in sides.items()))
    for step, _ in sides.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        timed(step, 2, settings.device)
    best, peaks = {name: float("inf") for name in sides}, {}
    for _ in range(args.rounds):
        for name, (step, _) in sides.items():
            if settings.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            best[name] = min(best[name], timed(step, args.steps, settings.device))
            if settings.device.startswith("cuda"):  # both models stay allocated: the peak includes the other's weights
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    rates = {name: args.steps * args.batch_size / seconds for name, seconds in best.items()}
    for name, rate in rates.items():
        memory = f", peak GPU memory {peaks[name] / 2**20:.0f} MiB" if name in peaks else ""
        print(f"  {name:8s} {rate:8.1f} images/s  ({best[name] / args.steps * 1000:.0f} ms per step, best of "
              f"{args.rounds} rounds of {args.steps}{memory})")
    ratio = rates["bare"] / rates["finetune"]
    print(f"ratio bare / finetune: {ratio:.3f} (goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
