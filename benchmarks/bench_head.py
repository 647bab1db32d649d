"""One MLP-head epoch over in-memory features vs a bare torch loop over tensors of the same shapes.

Both sides: the recipe's layers (Dropout 0.5, Linear(D,1000), ReLU, Dropout 0.5, Linear(1000,C)),
Adam, the same batch size, one shuffled pass. The head's figure is the epoch time it records in
``history_`` (no validation set, so no evaluation inside the epoch); its whole ``fit`` (scaler
included) is printed too. Random features are fine for timing. Goal: ratio <= 1.5.

    python benchmarks/bench_head.py                 # recipe scale (25,000 x 8,192, 2 classes) and small
    python benchmarks/bench_head.py --scale small --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import featurekit  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np
import torch
import torch.nn.functional as F

from featurekit.heads import MLPHead, build_mlp

SCALES = {"recipe": (25_000, 8_192, 2), "small": (2_000, 1_280, 10)}


def bare_epoch(X: torch.Tensor, t: torch.Tensor, n_classes: int, batch_size: int, device: str) -> float:
    """Seconds for one epoch of the plainest loop: randperm, slice, forward, backward, step."""
    torch.manual_seed(0)
    model = build_mlp(X.shape[1], (1000,), n_classes, 0.5).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    X, t = X.to(device), t.to(device)
    _sync(device)
    start = time.perf_counter()
    order = torch.randperm(len(X), device=device)
    for begin in range(0, len(X), batch_size):
        batch = order[begin:begin + batch_size]
        loss = F.cross_entropy(model(X[batch]), t[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def head_epoch(X: np.ndarray, y: np.ndarray, batch_size: int, device: str) -> tuple[float, float]:
    """(seconds of the head's one training epoch, seconds of its whole fit)."""
    head = MLPHead(max_epochs=1, batch_size=batch_size, device=device)
    start = time.perf_counter()
    head.fit(X, y)
    return head.history_[0]["seconds"], time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(scale: str, batch_size: int, device: str, repeats: int) -> None:
    n, d, c = SCALES[scale]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.integers(0, c, n)
    warm = batch_size * 4
    bare_epoch(torch.from_numpy(X[:warm]), torch.from_numpy(y[:warm]), c, batch_size, device)  # warm-up
    bare = min(bare_epoch(torch.from_numpy(X), torch.from_numpy(y), c, batch_size, device) for _ in range(repeats))
    head, fit = min(head_epoch(X, y, batch_size, device) for _ in range(repeats))
    print(f"{scale:6s} {n:>6} x {d:<5} C={c:<3} batch {batch_size:<4} {device}: bare loop {bare:7.2f} s/epoch, "
          f"MLPHead {head:7.2f} s/epoch (fit incl. scaler {fit:7.2f} s), ratio {head / bare:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=[*SCALES, "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per side")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for scale in (SCALES if args.scale == "all" else [args.scale]):
        run(scale, args.batch_size, args.device, args.repeats)


if __name__ == "__main__":
    main()
