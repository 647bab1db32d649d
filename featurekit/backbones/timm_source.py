"""``timm:<model>[.<tag>]``: ``timm.create_model(model, num_classes=0)``, its features
``forward_head(forward_features(x), pre_logits=True)`` (with no classifier that is the model's own
forward), its preprocessing ``timm.data.resolve_model_data_config(model)`` as ``create_transform``
applies it for evaluation (crop modes ``center``, ``squash``, ``border``; tests/test_sources.py).

Weights: the tag's pretrained ones through timm's own download and cache (the Hugging Face cache
for ``hf_hub_id`` checkpoints, ``$TORCH_HOME/hub/checkpoints`` for URL ones), seeded random ones,
or a local state dict or safetensors file (through the model family's ``checkpoint_filter_fn``,
which maps original checkpoints to timm's names, then matched by name and shape).
Attention runs through ``scaled_dot_product_attention`` (timm's ``fused_attn``, fixed per module when
it is built: set on every attention module here, unless ``TIMM_FUSED_ATTN=0`` asks otherwise).
"""

from __future__ import annotations

import difflib
import math
import os
import sys

from torch import nn

from ..errors import BackboneError
from ..store.format import RANDOM
from ..views.preprocessing import Preprocessing
from .registry import import_source
from .sources import (
    PRETRAINED,
    Built,
    check_pool,
    config_sha256,
    from_cache_or_hub,
    hub_endpoint,
    hub_hint,
    pool_tokens,
)
from .trunks import FeatureTrunk, check_node, random_info
from .weights import WeightsInfo, load_file, seed_random, state_sha256

__all__ = ["token_pools"]


class TimmTrunk(nn.Module):
    """``default``: the model's forward (``num_classes=0``: ``forward_head(..., pre_logits=True)``); token
    pools: timm's own pooling of ``forward_features`` (through the final norm; the class token, the
    mean of the tokens after ``num_prefix_tokens``) followed by ``fc_norm``, i.e. ``forward_head``
    with another pool type. ``float32[B, 3, H, W] -> float32[B, D]``."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.body, self.pool = model, pool
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))

    def forward(self, images):
        if self.pool == "default":
            return self.body(images)
        return pool_tokens(self.body.forward_features(images), self.pool, self.prefix,
                           getattr(self.body, "fc_norm", None))


def token_pools(model: nn.Module) -> tuple[str, ...]:
    """The pools a timm model has: token models (``num_prefix_tokens``) mean, and cls where they have a
    class token; convnets and hierarchical models their pooled pre-logits only."""
    if not hasattr(model, "num_prefix_tokens") or getattr(model, "global_pool", None) is None:
        return ("default",)
    has_class = getattr(model, "cls_token", None) is not None
    return ("default", "cls", "mean", "cls+mean") if has_class else ("default", "mean")


def build(name: str, spec: str, weights: str, weights_path: str | None, node: str | None, pool: str,
          **model_kwargs) -> Built:
    timm = import_source("timm", name)
    arch, _, tag = spec.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise BackboneError(f"{name}: timm has no model {arch!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                     else "; list-backbones --source timm lists them"))
    if tag and spec not in timm.list_pretrained(f"{arch}.*"):
        tags = [known.split(".", 1)[1] for known in timm.list_pretrained(f"{arch}.*")]
        raise BackboneError(f"{name}: timm has no tag {tag!r} for {arch} (its tags: {', '.join(tags) or 'none'})")
    kwargs = {"num_classes": 0, **model_kwargs}
    if "img_size" in kwargs:  # timm keeps the pretrained cfg's input size whatever img_size says: follow the model
        size = kwargs["img_size"]
        overlay = {"input_size": (3, *((size, size) if isinstance(size, int) else size))}
        kwargs["pretrained_cfg_overlay"] = {**overlay, **kwargs.get("pretrained_cfg_overlay", {})}
    if weights_path or weights == RANDOM:
        model = seed_random(lambda: timm.create_model(spec, pretrained=False, **kwargs))
        info = load_file(model, weights_path, _checkpoint_filter(model)) if weights_path else random_info(model)
    else:
        cfg = timm.models.get_pretrained_cfg(spec) or timm.create_model(spec, pretrained=False, **kwargs).pretrained_cfg
        cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
        where = (hub_hint(cfg["hf_hub_id"]) if cfg.get("hf_hub_id") else
                 f"put {os.path.basename(cfg.get('url') or '?')} in {_torch_checkpoints()} (TORCH_HOME decides where)")
        model = from_cache_or_hub(name, lambda: timm.create_model(spec, pretrained=True, **kwargs),
                                  hub_endpoint() if cfg.get("hf_hub_id") else cfg.get("url") or hub_endpoint(), where)
        origin = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else cfg.get("url", "")
        info = WeightsInfo(PRETRAINED, state_sha256(model), origin)
    if os.environ.get("TIMM_FUSED_ATTN") != "0":
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
    data_config = timm.data.resolve_model_data_config(model)
    preprocessing = timm_preprocessing(data_config)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None and not getattr(model, "dynamic_img_size", False) and tuple(fixed) != preprocessing.size:
        raise BackboneError(f"{name}: the model takes {tuple(fixed)} images but its data config says input size "
                            f"{data_config['input_size'][1:]} (give img_size and pretrained_cfg_overlay alike)")
    source = {"library": "timm", "version": timm.__version__, "model": arch, "tag": model.pretrained_cfg.get("tag"),
              "config_sha256": config_sha256({"model": spec, "kwargs": kwargs, "pretrained_cfg": model.pretrained_cfg}),
              "pool": pool, **({"kwargs": model_kwargs} if model_kwargs else {})}
    if node:
        return Built(_node_trunk(name, model, node), preprocessing, info, {**source, "output": f"node {node}"}, node)
    check_pool(name, pool, token_pools(model), f"timm's {type(model).__name__}")
    output = "forward_head(pre_logits=True)" if pool == "default" else pool
    return Built(TimmTrunk(model, pool), preprocessing, info, {**source, "output": output}, pool)


def timm_preprocessing(data_config: dict) -> Preprocessing:
    """What ``timm.data.create_transform(**data_config)`` does for evaluation
    (timm/data/transforms_factory.py ``transforms_imagenet_eval``): the resize size is
    ``floor(size / crop_pct)`` per side; ``squash``: Resize to it + CenterCrop; ``border``:
    ResizeKeepRatio(longest=1) + CenterCropOrPad with ``round(255 * mean)``; ``center``: Resize(int)
    where the size is square, else ResizeKeepRatio, then CenterCrop. All on PIL images."""
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 0.875
    mode = data_config.get("crop_mode") or "center"
    resize = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    common = dict(resize_size=resize, crop_size=(height, width), mean=tuple(data_config["mean"]),
                  std=tuple(data_config["std"]), interpolation=data_config["interpolation"])
    if mode == "squash":
        return Preprocessing(resize_mode="squash", **common)
    if mode == "border":
        return Preprocessing(resize_mode="longer_round", fill=tuple(round(255 * v) for v in data_config["mean"]),
                             **common)
    if mode != "center":
        raise BackboneError(f"timm crop_mode {mode!r} is not one of center, squash, border")
    return Preprocessing(resize_mode="shorter" if resize[0] == resize[1] else "shorter_round", **common)


def _node_trunk(name: str, model: nn.Module, node: str) -> FeatureTrunk:
    """The model's graph up to ``node``, traced with timm's own FX wrappers (its leaf modules)."""
    from timm.models import create_feature_extractor, get_graph_node_names

    try:
        nodes = get_graph_node_names(model)[1]
    except Exception as error:  # FX cannot trace data-dependent control flow
        raise BackboneError(f"{name}: --node needs the model's graph, which cannot be traced "
                            f"({str(error).splitlines()[0][:100] if str(error) else type(error).__name__}); "
                            "take --pool instead") from None
    check_node(name, nodes, node)
    return FeatureTrunk(model, node, create_feature_extractor)


def _checkpoint_filter(model: nn.Module):
    """The model family's own conversion of checkpoints to timm's names (e.g. original DINOv2 or
    OpenAI CLIP ones; resampled position embeddings), where it has one."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return (lambda state: convert(state, model)) if convert else None


def _torch_checkpoints() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")
