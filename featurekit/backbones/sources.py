"""Backbones of other libraries: ``timm:<model>[.<tag>]``, ``open_clip:<model>/<pretrained>``,
``hf:<repo id or folder>``, built into the same :class:`~featurekit.backbones.trunks.Backbone` as
torchvision's (a frozen trunk ``float32[B, 3, H, W] -> float32[B, D]``, its preprocessing, its weights).

What every source shares lives here: the build itself (:func:`load_source`), the token pools,
weights from the library's cache (looked up without the network first, so a machine without one
fails at once, in one line naming the cache folder), and quiet library calls. Each library's own
part is one module: :mod:`.timm_source`, :mod:`.open_clip_source`, :mod:`.hf_source`.

``--pool`` (:data:`~featurekit.backbones.registry.POOLS`), on the final-normalised token sequence:
``default`` the library's own pooled output, ``cls`` the class token, ``mean`` the mean of the
patch tokens (class and register tokens left out), ``cls+mean`` both concatenated (DINOv2's
linear-probe input), ``pre-proj`` a CLIP tower's pooled vector before its projection
(docs/backbones.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import BackboneError, WeightsError, first_line
from ..store.format import RANDOM
from ..views.preprocessing import Preprocessing
from .registry import POOLS, BackboneSpec, split_source
from .trunks import Backbone
from .weights import WeightsInfo

__all__ = ["Built", "PRETRAINED", "check_pool", "config_sha256", "from_cache_or_hub", "hub_endpoint", "hub_hint",
           "load_source", "no_node", "pool_tokens", "unwrap_prefix"]

PRETRAINED = "pretrained"  # the weights name a store records for the library's own pretrained weights
PRETRAINED_NAMES = ("DEFAULT", PRETRAINED)  # what --weights takes for them


@dataclass
class Built:
    """What a source builder returns: the trunk (its ``body`` the library's module), the preprocessing,
    the weights, what the store records of the source (library, version, model, tag, config sha256,
    pool, output) and the node (the pool, or ``--node``)."""

    trunk: nn.Module
    preprocessing: Preprocessing
    weights: WeightsInfo
    source: dict
    node: str


def load_source(name: str, weights: str, weights_path: str | None, node: str | None, pool: str,
                model_kwargs: dict | None = None) -> Backbone:
    """Build the backbone ``name`` of another library (:func:`~featurekit.backbones.trunks.load_backbone`)."""
    from . import hf_source, open_clip_source, timm_source

    source, model = split_source(name)
    if source == "hf" and Path(model).is_dir():  # a folder is named by its absolute path: predict finds it anywhere
        name, model = f"hf:{Path(model).resolve()}", str(Path(model).resolve())
    if pool not in POOLS:
        raise BackboneError(f"{name}: unknown pool {pool!r} (choose from {', '.join(POOLS)})")
    if node and pool != "default":
        raise BackboneError(f"{name}: give --node or --pool, not both")
    if model_kwargs and source != "timm":
        raise BackboneError(f"{name}: model arguments are taken by timm: backbones only")
    if weights not in (*PRETRAINED_NAMES, RANDOM) and not weights_path:
        raise WeightsError(f"{name}: unknown weights {weights!r} (DEFAULT: the library's pretrained ones, random, or "
                           "--weights-path; the model name chooses which pretrained ones)")
    builder = {"timm": timm_source.build, "open_clip": open_clip_source.build, "hf": hf_source.build}[source]
    with quiet():
        built = builder(name, model, weights, weights_path, node, pool, **(model_kwargs or {}))
    built.trunk.eval().requires_grad_(False)
    spec = BackboneSpec(name, source, "DEFAULT", description=f"{source} {model}")
    return Backbone(spec, built.node, built.trunk, built.preprocessing, measure_dim(built.trunk, built.preprocessing),
                    built.weights, built.node == "default", built.source)


def measure_dim(trunk: nn.Module, preprocessing: Preprocessing) -> int:
    """Features per image: the trunk run on one blank input."""
    with torch.inference_mode():
        return int(trunk(torch.zeros(1, 3, *preprocessing.size)).shape[1])


def pool_tokens(tokens: torch.Tensor, pool: str, prefix: int, norm: nn.Module | None = None) -> torch.Tensor:
    """``cls`` / ``mean`` / ``cls+mean`` of a token sequence ``float[B, T, C]`` whose first ``prefix``
    tokens are the class and register tokens: ``float[B, C]`` (``2C`` for cls+mean); ``norm`` is
    applied to each pooled part (timm's ``fc_norm``)."""
    parts = ([tokens[:, 0]] if pool in ("cls", "cls+mean") else []) + \
            ([tokens[:, prefix:].mean(dim=1)] if pool in ("mean", "cls+mean") else [])
    if norm is not None:
        parts = [norm(part) for part in parts]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def check_pool(name: str, pool: str, allowed: tuple[str, ...], kind: str) -> None:
    """One line unless ``pool`` is one this model (``kind``, for the message) has."""
    if pool not in allowed:
        hint = " (a convnet: --node picks a layer where its graph traces)" if "cls" not in allowed else ""
        raise BackboneError(f"{name}: --pool {pool} is not available for {kind}; it has {', '.join(allowed)}{hint}")


def no_node(name: str, node: str | None) -> None:
    if node:
        raise BackboneError(f"{name}: --node takes timm: convnets, whose graph traces; this source takes --pool")


def config_sha256(config: object) -> str:
    """sha256 of a configuration as sorted JSON (values JSON cannot hold as their text)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def unwrap_prefix(prefix: str) -> Callable[[dict], dict]:
    """A state-dict conversion: the tensors under ``prefix`` without it, where there are any (a whole
    CLIP checkpoint's image tower), else the state dict as it is (a tower's own)."""
    def convert(state: dict) -> dict:
        inner = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        return inner or state
    return convert


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The libraries' own warnings, log lines and progress bars off while they build (featurekit says
    what matters itself: random weights, the weights loaded and what did not fit)."""
    progress = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            import transformers

            progress = transformers.utils.logging.is_progress_bar_enabled()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass
        try:
            yield
        finally:
            logging.disable(previous)
            if progress:
                transformers.utils.logging.enable_progress_bar()


# --------------------------------------------------------------------------- pretrained weights and caches


def hub_folder(repo_id: str) -> Path:
    """Where the Hugging Face cache keeps ``repo_id``'s files (``HF_HOME`` / ``HF_HUB_CACHE`` decide)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def hub_hint(repo_id: str) -> str:
    return (f"put the files of {repo_id} in the Hugging Face cache, {hub_folder(repo_id)} (HF_HOME or HF_HUB_CACHE "
            f"decides where; `hf download {repo_id}` on a connected machine fills it: copy that folder here)")


def from_cache_or_hub(name: str, load: Callable[[], object], host: str, where: str) -> object:
    """``load()`` the library's pretrained weights: first from the local caches only (the Hub in offline
    mode: no network, no retries), then, where that misses and ``host`` answers, downloading them.
    Neither: one :class:`WeightsError` naming the model and ``where`` to put the files."""
    from huggingface_hub import constants

    forced = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # huggingface_hub reads this constant on every request
    try:
        return load()
    except _MISSING as error:  # the Hub's and torch.hub's "not there" (OSError), open_clip's RuntimeError
        missed = first_line(error)
    finally:
        constants.HF_HUB_OFFLINE = forced
    if not forced and _answers(host):
        try:
            return load()
        except _MISSING as error:
            missed = first_line(error)
    offline = "offline (HF_HUB_OFFLINE is set)" if forced else f"{host} cannot be reached"
    raise WeightsError(f"{name}: its pretrained weights are not in the local cache and {offline} ({missed[:120]}): "
                       f"{where}; or pass --weights-path FILE, or --weights random for a smoke run")


_MISSING = (OSError, RuntimeError, ValueError)  # what the libraries raise for weights they cannot get


def _answers(host: str) -> bool:
    """Whether ``host`` (a name or URL) accepts a connection within 3 seconds."""
    parsed = urllib.parse.urlparse(host if "//" in host else f"https://{host}")
    try:
        with socket.create_connection((parsed.hostname or host, parsed.port or 443), timeout=3):
            return True
    except OSError:
        return False


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
