"""Where torch runs and at what precision: device names, compute precisions and worker counts,
resolved against this machine.

Importing this module imports no torch (the command line reads :data:`PRECISIONS` for its
choices); the functions that ask torch import it when called.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SettingsError

if TYPE_CHECKING:
    import torch

__all__ = ["AUTO", "DEVICES", "PRECISIONS", "auto_precision", "default_workers", "native_bf16_cpu",
           "resolve_device", "torch_dtype"]

AUTO = "auto"  # decided against the machine: the device (cuda if available), the precision (auto_precision)
PRECISIONS = ("fp32", "bf16", "fp16")  # compute precisions; torch_dtype gives each one's dtype
DEVICES = ("cpu", "cuda")  # device types featurekit runs on (cuda or cuda:N)


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There oneDNN runs the
    trunks 2-3x faster in bf16 than in fp32; elsewhere it emulates bf16 and gains nothing."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: stay with fp32
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


def auto_precision(device: str) -> str:
    """bf16 where the device computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32."""
    return "bf16" if device.startswith("cuda") or (device == "cpu" and native_bf16_cpu()) else "fp32"


def torch_dtype(precision: str) -> "torch.dtype":
    """The torch dtype of a compute precision of :data:`PRECISIONS`."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_device(device: str, local_rank: int | None = None) -> str:
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N`` as a device torch takes; a device
    that is not there, or of a type featurekit does not run on (mps, xpu, ...), is a one-line
    :class:`SettingsError`. Under torchrun, ``cuda`` means ``cuda:<local_rank>``."""
    import torch

    if device == AUTO:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingsError(f"unknown device {device!r} (auto, cpu, cuda or cuda:N)") from None
    if parsed.type not in DEVICES:
        raise SettingsError(f"--device {device}: featurekit runs on cpu or cuda (cuda:N), not {parsed.type}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = parsed.index if parsed.index is not None else (local_rank or 0)
        if index >= count:
            raise SettingsError(f"--device {device}: " + (f"this machine has {count} CUDA device(s)" if count else
                                                          "no CUDA device is available here; use --device cpu"))
        return f"cuda:{index}" if parsed.index is not None or local_rank is not None else "cuda"
    return str(parsed)


def default_workers(device: str) -> int:
    """Decoding processes for a run on ``device`` (resolved): the cores, at most 16, for a GPU to
    feed; half of them on the CPU, where the model needs the cores more than decoding does."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 16) if device.startswith("cuda") else max(1, cores // 2)
