"""Stage 3 in motion: the one trunk runner, for every stage that turns images into features.

    images -> decode once (loader workers, or nvJPEG on the device) -> one uint8 view per distinct
           preprocessing -> normalise on the device -> every prepared trunk -> features [B, D]

extract (stores), predict (a head's backbones, under the settings its stores recorded), embed
(a few images, in memory) and fine-tuning all run trunks through :class:`TrunkRunner`: equal
:class:`RunSettings` give equal features, and :func:`store_identity` says what a store made
under them records.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import fx, nn
from torch.fx.experimental.optimization import matches_module_pattern, replace_node_module
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from tqdm import tqdm

from ..devices import torch_dtype
from ..errors import ImageDecodeError, SettingsError
from ..images.decode import DecodePolicy
from ..store.format import RANDOM
from ..views.augment import ViewPlan
from ..views.gpu_decode import decode_batch
from ..views.loader import Source, ViewBatch, ViewDataset, iterate_views
from ..views.preprocessing import Preprocessing
from .settings import AUTO_DTYPE, BackboneChoice, RunSettings
from .trunks import Backbone, load_backbone

__all__ = ["FileFeatures", "TrunkRunner", "device_views", "embed", "fold_and_cast", "prepare_trunk", "storage_dtype"]

FOLDABLE = [(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
            (nn.Linear, nn.BatchNorm1d)]  # torch.fx's own fuse() patterns, in its order


def storage_dtype(requested: str, backbones: Sequence[Backbone]) -> str:
    """The storage dtype of a run: ``requested``, or for ``auto`` float16 (half the disk and memory,
    no loss a head notices) unless a backbone has random weights: their activations are not
    normalised by training and exceed float16's range (a random resnet152's pooled features reach
    4e8 > 65504), so such runs store float32. One dtype for the whole run: its stores are read together."""
    if requested != AUTO_DTYPE:
        return requested
    return "float32" if any(b.weights.name == RANDOM for b in backbones) else "float16"


def prepare_trunk(backbone: Backbone, settings: RunSettings) -> torch.nn.Module:
    """The trunk as it runs (``settings`` resolved): folded and cast (:func:`fold_and_cast`), on the
    device in the memory format, compiled on request. The caller's Backbone stays as built."""
    trunk = _alias_copy(backbone.trunk).eval()  # deepcopy of an FX module resets eval mode
    trunk.body = fold_and_cast(trunk.body, torch_dtype(settings.precision))
    memory_format = torch.channels_last if settings.channels_last else torch.preserve_format
    trunk = trunk.to(settings.device, memory_format=memory_format)
    return torch.compile(trunk) if settings.compile else trunk


def fold_and_cast(body: nn.Module, dtype: torch.dtype, trainable_modules: Collection[str] = (),
                  trainable_parameters: Collection[str] = ()) -> nn.Module:
    """``body`` prepared to run in eval mode: an FX graph (torchvision's and timm's ``--node`` trunks)
    as a plain graph module with each BatchNorm folded into the convolution or linear layer before
    it (one pass less over each activation, ~10% on CPU); any body with its tensors cast once to
    ``dtype`` (autocast would cast them again on every batch: 0.5 GB per VGG19 forward). Extraction
    prepares whole trunks so; fine-tuning leaves its trainable part (``trainable_modules``: module
    names in ``body``; ``trainable_parameters``) unfolded, in fp32, with gradients on, so a frozen
    part computes what extraction computes. The result takes over ``body``'s modules: use only the
    result afterwards."""
    if isinstance(body, fx.GraphModule):
        prepared = _folded(body, set(trainable_modules))
    else:  # another library's model, run by its own forward: nothing to fold
        prepared = body
    trainable_modules = set(trainable_modules)
    for name, param in list(prepared.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        if name in trainable_parameters:
            param.requires_grad_(True)
        else:
            prepared.get_submodule(owner)._parameters[leaf] = nn.Parameter(param.detach().to(dtype),
                                                                           requires_grad=False)
    for name, buffer in list(prepared.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if owner not in trainable_modules and buffer.is_floating_point():
            prepared.get_submodule(owner)._buffers[leaf] = buffer.to(dtype)
    return prepared


def _folded(body: fx.GraphModule, trainable_modules: set[str]) -> fx.GraphModule:
    """``body``'s graph with each BatchNorm outside ``trainable_modules`` folded into the layer before it."""
    prepared = fx.GraphModule(body, copy.deepcopy(body.graph))
    modules = dict(prepared.named_modules())
    for pattern in FOLDABLE:
        for node in list(prepared.graph.nodes):
            if not matches_module_pattern(pattern, node, modules) or len(node.args[0].users) > 1:
                continue  # the layer's output is used elsewhere too: folding would change that use
            layer, norm = node.args[0].target, node.target
            if {layer, norm} & trainable_modules or not modules[norm].track_running_stats:
                continue
            fold = fuse_linear_bn_eval if pattern[0] is nn.Linear else fuse_conv_bn_eval
            replace_node_module(node.args[0], modules, fold(modules[layer], modules[norm]))
            node.replace_all_uses_with(node.args[0])
            prepared.graph.erase_node(node)
    prepared.delete_all_unused_submodules()
    prepared.recompile()
    return prepared


def _alias_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers share storage with the original's.
    Converting the copy (``.to``, fusing) rebinds its tensors and never writes into the original,
    and a conversion that changes nothing (fp32 on CPU) costs no second copy of the weights."""
    memo: dict[int, object] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b.detach() for b in module.buffers()})
    return copy.deepcopy(module, memo)


@dataclass
class FileFeatures:
    """Features of given images: ``features[store_name]`` is float32[len(kept), D], rows in input order."""

    features: dict[str, np.ndarray]
    kept: list[int]  # indices into the given sources that decoded
    errors: list[tuple[str, str]]  # (name, reason) of those that did not


class TrunkRunner:
    """The prepared trunks of ``backbones`` on one device, fed by one decode per image.

    ``settings`` must be resolved (:meth:`RunSettings.resolved`); a dtype ``auto`` is decided here.
    """

    def __init__(self, backbones: Sequence[Backbone], settings: RunSettings):
        self.settings = settings = dataclasses.replace(settings, dtype=storage_dtype(settings.dtype, backbones))
        self.device = torch.device(settings.device)
        if self.device.type == "cuda":
            if self.device.index is not None:  # "cuda" is the current device; torch 2.11 refuses it without an index
                torch.cuda.set_device(self.device)  # events, streams and pinned copies follow the current device
            torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune each conv once
        self.backbones = list(backbones)
        names = [b.store_name for b in self.backbones]
        if len(set(names)) != len(names):
            raise SettingsError(f"backbone given twice: {', '.join(names)}")
        self.trunks = {b.store_name: prepare_trunk(b, settings) for b in self.backbones}
        self.preprocessings = {b.preprocessing.key: b.preprocessing for b in self.backbones}

    def stream(self, sources: Sequence[Source], chunks: Sequence[tuple[int, int]], label: str,
               plan: ViewPlan | None = None) -> Iterator[tuple[ViewBatch, dict[str, torch.Tensor]]]:
        """Yield ``(batch, {store_name: features[B, D]})`` over the row ``chunks`` of ``sources``, in order;
        with a ``plan`` of several views, ``features[B, plan.count, D]`` (:meth:`ViewPlan.split` them).

        Batches never cross a chunk. Decode failures raise under ``on_error=fail`` and ride along
        in ``batch.errors`` otherwise.
        """
        dataset = ViewDataset(sources, [b.preprocessing for b in self.backbones], self.settings.decode, plan)
        count = dataset.plan.count if dataset.plan else 1
        total = sum(stop - start for start, stop in chunks)
        with tqdm(total=total, desc=label, unit="img", disable=not self.settings.progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for batch in iterate_views(dataset, chunks, self.settings.batch_size, self.settings.num_workers,
                                       pin_memory=self.device.type == "cuda"):
                self._raise_failed(batch)
                outputs = self.forward(batch, count)  # may move GPU-decode failures to batch.errors
                self._raise_failed(batch)
                yield batch, outputs
                bar.update(len(batch.indices) + len(batch.errors))

    def embed(self, sources: Sequence[Source], label: str = "features", plan: ViewPlan | None = None) -> FileFeatures:
        """Features of ``sources`` (image paths or PIL images) in memory, float32, no store; with a
        ``plan`` of several views, float32[N, plan.count, D] (the plain view first). An image whose
        features (in any view) are not finite is refused as extract refuses it, in one line, or
        under ``on_error="skip"`` left out with its reason in ``errors``."""
        rows: dict[str, list[torch.Tensor]] = {b.store_name: [] for b in self.backbones}
        result = FileFeatures({}, [], [])
        chunks = [(start, min(start + self.settings.batch_size, len(sources)))
                  for start in range(0, len(sources), self.settings.batch_size)]
        for batch, outputs in self.stream(sources, chunks, label, plan):
            outputs = self._finite_rows(sources, batch, outputs)
            for name, features in outputs.items():
                rows[name].append(features.float().cpu())
            result.kept.extend(batch.indices)
            result.errors.extend((path, reason) for _, path, reason in batch.errors)
        per_image = (plan.count,) if plan is not None and plan.count > 1 else ()
        result.features = {b.store_name: torch.cat(rows[b.store_name]).numpy() if rows[b.store_name]
                           else np.zeros((0, *per_image, b.feature_dim), np.float32) for b in self.backbones}
        return result

    def forward(self, batch: ViewBatch, count: int = 1) -> dict[str, torch.Tensor]:
        """Every trunk on the batch: ``{store_name: float16|float32 [B, D]}`` on the device; for
        ``count`` views per image (``uint8[B, count, 3, H, W]``), ``[B, count, D]``, each view
        index run as one batch of the B images, so the plain views run as without other views.

        GPU-decoded images that fail are moved to ``batch.errors`` first, so ``batch.indices``
        lists exactly the rows returned.
        """
        views = self._views(batch)
        if not batch.indices:
            per_image = (count,) if count > 1 else ()
            return {b.store_name: torch.zeros(0, *per_image, b.feature_dim, dtype=getattr(torch, self.settings.dtype),
                                              device=self.device) for b in self.backbones}
        if count > 1:
            per_view = [self._forward(batch, {key: view[:, v] for key, view in views.items()}) for v in range(count)]
            return {name: torch.stack([outputs[name] for outputs in per_view], dim=1) for name in per_view[0]}
        return self._forward(batch, views)

    def _forward(self, batch: ViewBatch, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every trunk on one view of each image of the batch: ``{store_name: [B, D]}``."""
        storage = getattr(torch, self.settings.dtype)
        memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        count, dtype = len(batch.indices), torch_dtype(self.settings.precision)
        outputs = {}
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            inputs = {key: self._pad(self.preprocessings[key].normalize(view)).contiguous(memory_format=memory_format)
                      for key, view in views.items()}
            for backbone in self.backbones:
                features = self.trunks[backbone.store_name](inputs[backbone.preprocessing.key])
                outputs[backbone.store_name] = features[:count].to(storage)
        return outputs

    def to_host(self, rows: dict[str, list[torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Join each trunk's batches and start copying them to pinned host memory without waiting
        for the GPU; wait on the returned event (None on the CPU) before reading them."""
        if self.device.type != "cuda":
            return {name: torch.cat(parts) for name, parts in rows.items()}, None
        host = {}
        for name, parts in rows.items():
            joined = torch.cat(parts)
            host[name] = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
            host[name].copy_(joined, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def _finite_rows(self, sources: Sequence[Source], batch: ViewBatch,
                     outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``outputs`` without the rows that hold NaN or infinity in any view of any trunk: those move
        to ``batch.errors``, or under ``on_error="fail"`` the first is raised."""
        bad = torch.zeros(len(batch.indices), dtype=torch.bool)
        views = None
        for features in outputs.values():
            finite = torch.isfinite(features).cpu()
            bad |= ~finite.flatten(1).all(1)
            views = finite.all(-1) if views is None else views & finite.all(-1)  # [B] or [B, views]
        if not bad.any():
            return outputs
        cause = ("overflow of float16, the stores' dtype" if self.settings.dtype == "float16"
                 else "NaN or infinity from the model")
        for row in bad.nonzero().flatten().tolist():
            view = int((~views[row]).nonzero()[0]) if views.ndim > 1 else 0
            where = f" in view {view} (0 is the plain one)" if views.ndim > 1 else ""
            batch.errors.append((batch.indices[row], sources[batch.indices[row]][1],
                                 f"non-finite features{where} ({cause})"))
        self._raise_failed(batch)
        keep = ~bad
        batch.indices = [index for index, good in zip(batch.indices, keep.tolist()) if good]
        return {name: features[keep.to(features.device)] for name, features in outputs.items()}

    def _raise_failed(self, batch: ViewBatch) -> None:
        if batch.errors and self.settings.on_error == "fail":
            raise ImageDecodeError(*batch.errors[0][1:])

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        """Compiled trunks see one batch shape only (a short last batch would recompile)."""
        missing = self.settings.batch_size - images.shape[0]
        if not self.settings.compile or missing <= 0:
            return images
        return torch.cat([images, images.new_zeros(missing, *images.shape[1:])])

    def _views(self, batch: ViewBatch) -> dict[str, torch.Tensor]:
        return device_views(batch, self.device, self.preprocessings, self.settings.decode)


def device_views(batch: ViewBatch, device: torch.device, preprocessings: dict[str, Preprocessing],
                 decode: DecodePolicy) -> dict[str, torch.Tensor]:
    """``{preprocessing key: uint8[B, 3, H, W]}`` on ``device``, in ``batch.indices`` order.

    JPEGs left for the GPU are decoded there; those that fail move to ``batch.errors`` and out of
    ``batch.indices``, so the rows returned are exactly ``batch.indices``.
    """
    cpu = {key: view.to(device, non_blocking=True) for key, view in batch.views.items()}
    if not batch.raw:
        return cpu
    rows = {row: {key: view[j] for key, view in cpu.items()} for j, row in enumerate(batch.cpu_rows)}
    for row, image in zip(batch.raw_rows, decode_batch(batch.raw, device, decode)):
        if isinstance(image, ImageDecodeError):
            batch.errors.append((batch.indices[row], image.path, image.reason))
        else:
            rows[row] = {key: p.view_tensor(image) for key, p in preprocessings.items()}
    order = sorted(rows)
    batch.indices = [batch.indices[row] for row in order]
    return {key: torch.stack([rows[row][key] for row in order]) for key in preprocessings} if order else {}


def embed(images: Sequence[str | Path | Image.Image], backbone: str | Backbone | Sequence[str | Backbone],
          weights: str = BackboneChoice.weights, *, node: str | None = BackboneChoice.node,
          pool: str = BackboneChoice.pool, settings: RunSettings | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """Features of a few images, in memory, without writing a store: float32[len(images), D].

    ``images``: file paths (decoded under ``settings.decode``, EXIF orientation included) or PIL
    images (converted to RGB as they are). ``backbone``: a backbone name (built with ``weights``,
    ``node`` and ``pool``) or a :class:`~featurekit.backbones.Backbone` already built; a list or
    tuple of them gives ``{store_name: float32[len(images), D]}``, every image decoded once for all
    of them. The features are those extract would store for the same files under the same settings
    (default: ``auto`` precision, float32 here). A file that cannot be decoded raises :class:`ImageDecodeError`.
    """
    several = isinstance(backbone, (list, tuple))
    built = [b if isinstance(b, Backbone) else load_backbone(b, weights, node=node, pool=pool)
             for b in (backbone if several else [backbone])]
    settings = settings or RunSettings(dtype="float32", num_workers=0, progress=False)
    runner = TrunkRunner(built, dataclasses.replace(settings, on_error="fail").resolved())
    sources = [(image, f"image #{i}") if isinstance(image, Image.Image) else (str(image), str(image))
               for i, image in enumerate(images)]
    features = runner.embed(sources).features
    return features if several else features[built[0].store_name]
