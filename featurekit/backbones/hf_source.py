"""``hf:<repo id or local folder>``: a Hugging Face transformers vision model (``AutoModel``) with its
own image processor (``AutoImageProcessor``, its default backend).

Features (``--pool default``): ``get_image_features`` for dual models (CLIP, SigLIP: the projected
image embedding), else ``pooler_output`` where the model has one whose weights were loaded (a
``ViTModel`` read from a classifier checkpoint gets a random pooler, which transformers only logs:
then the patch-token mean), else the mean of ``last_hidden_state``. Token pools work on the
final-normalised tokens (CLIP's ``post_layernorm`` applied to every token first).

Preprocessing: the processor's stock pipeline (transformers/image_processing_backends.py): resize
(``shortest_edge``, or ``height``/``width``), centre crop at ``(H - h) // 2``, rescale, normalise. The
default backend resizes the uint8 tensor with torchvision v2's kernel (not PIL: 1-2 grey levels
apart), and DINOv3's processor rescales before resizing (float32 views). A processor with its own
``_preprocess`` (crop_pct, padding, patches) is refused in one line.

Weights: ``from_pretrained`` (the Hub's cache, or the folder), seeded random ones on the model's
config, ``--weights-path`` a ``save_pretrained`` folder or a state-dict file. The model is built in
float32 (transformers 5 would keep a half-precision checkpoint in half precision) with
``attn_implementation="sdpa"`` where the model has it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError, WeightsError
from ..store.format import RANDOM
from ..views.preprocessing import Preprocessing, pair
from .registry import import_source
from .sources import (
    PRETRAINED,
    Built,
    check_pool,
    config_sha256,
    from_cache_or_hub,
    hub_endpoint,
    hub_hint,
    no_node,
    pool_tokens,
)
from .trunks import random_info
from .weights import WeightsInfo, load_file, seed_random, state_sha256

# Vision models whose last_hidden_state is not yet through the final norm (it normalises the pooled
# class token only, modeling_clip.py): the token pools apply it to every token first.
_TOKEN_NORM = {"clip_vision_model": "post_layernorm"}
# Models whose pooler_output is the final-normalised class token (no pooler weights to miss)
_NORMED_CLASS_TOKEN = ("dinov2", "dinov2_with_registers", "dinov3_vit", "clip_vision_model")
# Processors whose _preprocess is the stock one with the rescale moved before the resize (a float resize):
# transformers/models/dinov3_vit/image_processing_dinov3_vit.py
_RESCALE_FIRST = {"DINOv3ViTImageProcessor"}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFTrunk(nn.Module):
    """The model ``body``; ``output``: ``image_features`` (dual models' projected embedding),
    ``pooler_output``, or a token pool (``cls``, ``mean``, ``cls+mean``; convnets: the spatial mean).
    ``float32[B, 3, H, W] -> float32[B, D]``."""

    def __init__(self, model: nn.Module, output: str, patch_size: int, token_norm: str | None):
        super().__init__()
        self.body, self.output, self.patch_size, self.token_norm = model, output, patch_size, token_norm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.output == "image_features":
            out = self.body.get_image_features(pixel_values=images)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        vision = vision_model(self.body)
        out = vision(pixel_values=images)
        if self.output == "pooler_output":
            return out.pooler_output.flatten(1)
        tokens = out.last_hidden_state
        if tokens.dim() == 4:  # convnets: [B, C, h, w]
            return tokens.mean(dim=(2, 3))
        if self.token_norm:
            tokens = getattr(vision, self.token_norm)(tokens)
        patches = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        return pool_tokens(tokens, self.output, tokens.shape[1] - patches)


def vision_model(model: nn.Module) -> nn.Module:
    """The image tower of a dual (image-text) model, or the model."""
    return model.vision_model if is_dual(model) else model


def is_dual(model: nn.Module) -> bool:
    return hasattr(model, "get_image_features") and hasattr(model, "vision_model")


def build(name: str, spec: str, weights: str, weights_path: str | None, node: str | None, pool: str) -> Built:
    transformers = import_source("hf", name)
    no_node(name, node)
    folder = Path(weights_path) if weights_path and Path(weights_path).is_dir() else None
    where = folder or (Path(spec) if Path(spec).is_dir() else None)
    config, processor = _config_and_processor(name, str(where) if where else spec)
    attention = {"attn_implementation": "sdpa"}
    if weights_path and not folder:
        if not Path(weights_path).is_file():
            raise WeightsError(f"{weights_path}: weights file or save_pretrained folder not found")
        model = seed_random(lambda: _from_config(transformers, config, attention))
        info = load_file(model, weights_path)
        missing = list(info.report.missing)
    elif weights == RANDOM and not folder:
        model = seed_random(lambda: _from_config(transformers, config, attention))
        info, missing = random_info(model), []
    else:
        def load(extra=attention):
            try:
                return transformers.AutoModel.from_pretrained(str(where) if where else spec, dtype=torch.float32,
                                                              output_loading_info=True, **extra)
            except ValueError:  # no sdpa for this architecture: once more without
                if not extra:
                    raise
                return load({})
        model, loading = load() if where else from_cache_or_hub(name, load, hub_endpoint(), hub_hint(spec))
        missing = list(loading.get("missing_keys", []))
        info = WeightsInfo(f"file:{folder.name}" if folder else PRETRAINED, state_sha256(model),
                           str(where.resolve()) if where else f"hf-hub:{spec}")
    model.eval()
    vision = vision_model(model)
    vision_type = vision.config.model_type
    has_class = any(key.endswith(("cls_token", "class_embedding")) for key, _ in vision.named_parameters())
    allowed = ("default", "mean", *(("cls", "cls+mean") if has_class else ()),
               *(("pre-proj",) if is_dual(model) else ()))
    check_pool(name, pool, allowed, f"transformers' {type(model).__name__}")
    pooler = _has_pooler(vision, vision_type) and not any(k.startswith("pooler.") or ".pooler." in k for k in missing)
    output = {"default": "image_features" if is_dual(model) else "pooler_output" if pooler else "mean",
              "pre-proj": "pooler_output"}.get(pool, pool)
    patch = getattr(vision.config, "patch_size", 1)
    trunk = HFTrunk(model, output, int(patch if isinstance(patch, int) else patch[0]), _TOKEN_NORM.get(vision_type))
    source = {"library": "transformers", "version": transformers.__version__,
              "model": str(Path(spec).resolve()) if Path(spec).is_dir() else spec,
              "tag": getattr(config, "_commit_hash", None), "config_sha256": config_sha256(
                  {"config": {k: v for k, v in config.to_dict().items() if not k.startswith("_")
                              and k != "transformers_version"}, "processor": processor.to_dict()}),
              "pool": pool, "output": output, "processor": f"{type(processor).__name__} ({processor.backend})"}
    return Built(trunk, hf_preprocessing(processor), info, source, pool)


def _config_and_processor(name: str, where: str):
    from transformers import AutoConfig, AutoImageProcessor

    def load():
        return AutoConfig.from_pretrained(where), AutoImageProcessor.from_pretrained(where)
    if Path(where).is_dir():
        try:
            return load()
        except (OSError, ValueError) as error:
            raise WeightsError(f"{name}: {where} is not a save_pretrained folder with a config and an image "
                               f"processor ({str(error).splitlines()[0][:120]})") from None
    return from_cache_or_hub(name, load, hub_endpoint(), hub_hint(where))


def _from_config(transformers, config, attention: dict) -> nn.Module:
    try:
        return transformers.AutoModel.from_config(config, dtype=torch.float32, **attention)
    except ValueError:  # no sdpa for this architecture
        return transformers.AutoModel.from_config(config, dtype=torch.float32)


def _has_pooler(vision: nn.Module, vision_type: str) -> bool:
    """Whether ``pooler_output`` is a defined pooling (not None)."""
    if vision_type in _NORMED_CLASS_TOKEN:
        return True
    if vision_type == "siglip_vision_model":  # the MAP head
        return bool(getattr(vision.config, "vision_use_head", True))
    return getattr(vision, "pooler", None) is not None


def hf_preprocessing(processor) -> Preprocessing:
    """What a transformers (5.x) image processor's ``__call__`` does to one RGB PIL image, for the stock
    ``_preprocess`` of ``TorchvisionBackend`` (the default) or ``PilBackend``; others: one line."""
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    name, backend = type(processor).__name__, getattr(processor, "backend", None)
    stock = {"torchvision": TorchvisionBackend._preprocess, "pil": PilBackend._preprocess}.get(backend)
    rescale_first = name in _RESCALE_FIRST and backend == "torchvision"
    problem = None
    if not rescale_first and (stock is None or type(processor)._preprocess is not stock):
        problem = f"has its own preprocessing (backend {backend})"
    elif getattr(processor, "do_pad", None):
        problem = "pads its batches"
    elif not (processor.do_resize and processor.do_rescale and processor.do_normalize):
        problem = "does not resize, rescale and normalise"
    size = processor.size
    if size.shortest_edge and not size.longest_edge:
        resize_mode, resize_size = "shorter", size.shortest_edge
    elif size.height and size.width and not size.shortest_edge:
        resize_mode, resize_size = "squash", (size.height, size.width)
    else:
        resize_mode, resize_size, problem = "none", 0, problem or f"resizes to {dict(size)}"
    crop = (processor.crop_size.height, processor.crop_size.width) if processor.do_center_crop else resize_size
    if resize_mode == "shorter" and not processor.do_center_crop:
        problem = problem or "keeps each image's aspect ratio without a crop (inputs of varying size)"
    if backend == "pil" and processor.do_center_crop and min(crop) > min(pair(resize_size)):
        problem = problem or "pads as its PIL backend does (ceil on top and left)"
    if problem:
        raise BackboneError(f"{name}: featurekit does not reproduce this image processor: it {problem}")
    resample = processor.resample
    interpolation = resample.value if hasattr(resample, "value") and isinstance(resample.value, str) \
        else _RESAMPLE[int(resample)]
    mean, std = (tuple(v) if not isinstance(v, (int, float)) else (v,) * 3
                 for v in (processor.image_mean, processor.image_std))
    return Preprocessing(
        resize_size=resize_size, crop_size=crop, mean=mean, std=std, interpolation=interpolation,
        resize_mode=resize_mode, crop_mode="center_floor" if processor.do_center_crop else "none",
        resampler="torch" if backend == "torchvision" else "pil", rescale=float(processor.rescale_factor),
        normalization="fused" if backend == "torchvision" and not rescale_first else "rescale_first",
        view_dtype="float32" if rescale_first else "uint8")
