"""``open_clip:<model>/<pretrained>``: the image tower of ``open_clip.create_model``, its features what
``encode_image`` returns (after the projection; ``--pool pre-proj``: before it), its preprocessing what
``create_model_and_transforms`` returns for evaluation, read from the tower's ``preprocess_cfg``.

The pretrained tag carries part of the preprocessing (SigLIP's squash resize and 0.5 mean/std live in
the tag, not in the model config) and QuickGELU (the ``openai`` tags): both are taken from the tag
whatever the weights, so a random or local-file build preprocesses as the pretrained one does.
Weights: the tag's, through open_clip's download and cache (the Hugging Face cache for ``hf_hub``
tags, ``~/.cache/clip`` for URL ones), seeded random ones, or a local checkpoint file (a whole CLIP
model's, whose ``visual.`` tensors are the tower's, or the tower's own; matched by name and shape).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict

import torch
from torch import nn
from torch.nn import functional as TF

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
    no_node,
    pool_tokens,
    unwrap_prefix,
)
from .timm_source import token_pools
from .trunks import random_info
from .weights import WeightsInfo, load_file, seed_random, state_sha256


class OpenClipTrunk(nn.Module):
    """The image tower ``body``. ``default``: its forward (``encode_image``, after the projection);
    ``pre-proj``: the pooled vector before it (ViT: ``_pool`` without ``@ proj``; ModifiedResNet: the
    attention pool without ``c_proj``; timm towers: the timm trunk's output, before the head);
    token pools (plain ViT towers): ``ln_post`` of every token, then the class token and/or the patch
    mean. ``float32[B, 3, H, W] -> float32[B, D]``."""

    def __init__(self, visual: nn.Module, pool: str):
        super().__init__()
        self.body, self.pool, self.kind = visual, pool, type(visual).__name__

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tower = self.body
        if self.pool == "default":
            return tower(images)
        if self.kind == "VisionTransformer":
            tokens = tower.transformer(tower._embeds(images))
            return tower._pool(tokens)[0] if self.pool == "pre-proj" else pool_tokens(tower.ln_post(tokens), self.pool,
                                                                                      1)
        if self.kind == "ModifiedResNet":
            x = tower.layer4(tower.layer3(tower.layer2(tower.layer1(tower.stem(images)))))
            return x.mean(dim=(2, 3)) if self.pool == "mean" else attention_pool_without_projection(tower.attnpool, x)
        trunk = tower.trunk  # TimmModel
        return trunk(images) if self.pool == "pre-proj" else pool_tokens(
            trunk.forward_features(images), self.pool, trunk.num_prefix_tokens, getattr(trunk, "fc_norm", None))


def attention_pool_without_projection(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d.forward`` with its output projection ``c_proj`` (CLIP-ResNet's
    image projection) replaced by the identity: ``float[B, C, h, w] -> float[B, C]``."""
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    width = x.shape[-1]
    x, _ = TF.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=width, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=torch.eye(width, dtype=x.dtype, device=x.device),
        out_proj_bias=torch.zeros(width, dtype=x.dtype, device=x.device),
        use_separate_proj_weight=True, training=False, need_weights=False)
    return x[0]


def pools(tower: nn.Module) -> tuple[str, ...]:
    kind = type(tower).__name__
    if kind == "VisionTransformer":
        plain = tower.attn_pool is None and not tower.final_ln_after_pool and tower.pool_type == "tok"
        return ("default", "pre-proj", "cls", "mean", "cls+mean") if plain else ("default", "pre-proj")
    if kind == "ModifiedResNet":
        return ("default", "pre-proj", "mean")
    if kind == "TimmModel" and not hasattr(tower.head, "pool"):
        return ("default", "pre-proj", *token_pools(tower.trunk)[1:])
    return ("default",)


def tag_preprocess(model: str, tag: str) -> tuple[dict, bool]:
    """The tag's preprocessing (PreprocessCfg fields but ``size``, which the tower decides) and its
    QuickGELU flag: what ``create_model(model, pretrained=tag)`` merges (open_clip/factory.py)."""
    open_clip = import_source("open_clip", f"open_clip:{model}")
    from open_clip.transform import PreprocessCfg

    cfg = open_clip.get_pretrained_cfg(model, tag)
    names = set(PreprocessCfg.__dataclass_fields__) - {"size"}
    return {k: v for k, v in cfg.items() if k in names and v is not None}, bool(cfg.get("quick_gelu", False))


def build(name: str, spec: str, weights: str, weights_path: str | None, node: str | None, pool: str) -> Built:
    open_clip = import_source("open_clip", name)
    no_node(name, node)
    model_name, _, tag = spec.partition("/")
    if open_clip.get_model_config(model_name) is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        raise BackboneError(f"{name}: open_clip has no model {model_name!r}" + (
            f" (did you mean {', '.join(close)}?)" if close else "; list-backbones --source open_clip lists them"))
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if (tag and tag not in tags) or (not tag and weights != RANDOM and not weights_path):
        problem = f"open_clip has no tag {tag!r} for {model_name}" if tag else "pretrained weights need a tag"
        raise BackboneError(f"{name}: {problem}: open_clip:{model_name}/<pretrained> (its tags: "
                            f"{', '.join(tags) or 'none'})")
    force_preprocess, quick_gelu = tag_preprocess(model_name, tag) if tag else ({}, False)
    # open_clip only warns when a tag trained with QuickGELU (openai) meets a config without it
    common = dict(force_quick_gelu=quick_gelu, force_preprocess_cfg=force_preprocess)
    if weights_path or weights == RANDOM:
        model = seed_random(lambda: open_clip.create_model(model_name, pretrained=None, **common))
        info = (load_file(model.visual, weights_path, unwrap_prefix("visual.")) if weights_path
                else random_info(model.visual))
    else:
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        repo = "/".join(cfg.get("hf_hub", "").strip("/").split("/")[:2])
        where = hub_hint(repo) if repo else f"put {os.path.basename(cfg.get('url', ''))} in ~/.cache/clip"
        model = from_cache_or_hub(name, lambda: open_clip.create_model(model_name, pretrained=tag, **common),
                                  hub_endpoint() if repo else cfg.get("url", ""), where)
        info = WeightsInfo(PRETRAINED, state_sha256(model.visual), f"hf-hub:{repo}" if repo else cfg.get("url", ""))
    tower = model.visual
    check_pool(name, pool, pools(tower), f"open_clip's {type(tower).__name__} tower")
    preprocess_cfg = dict(tower.preprocess_cfg)
    source = {"library": "open_clip", "version": open_clip.__version__, "model": model_name, "tag": tag or None,
              "config_sha256": config_sha256({"model_cfg": open_clip.get_model_config(model_name),
                                              "quick_gelu": quick_gelu, "preprocess_cfg": preprocess_cfg}),
              "pool": pool, "output": "encode_image" if pool == "default" else pool}
    return Built(OpenClipTrunk(tower, pool), open_clip_preprocessing(preprocess_cfg), info, source, pool)


def open_clip_preprocessing(cfg) -> Preprocessing:
    """What ``image_transform_v2(PreprocessCfg(**cfg), is_train=False)`` does (open_clip/transform.py
    ``image_transform``): ``squash`` Resize to the size; ``longest`` ResizeKeepRatio(longest=1) +
    CenterCropOrPad with ``fill_color``; ``shortest`` Resize(int) + CenterCrop when square, else
    ResizeKeepRatio with its default BICUBIC, whatever ``interpolation`` says (kept: it is what runs)."""
    cfg = cfg if isinstance(cfg, dict) else asdict(cfg)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"  # 'random' -> bicubic
    mode = cfg.get("resize_mode") or "shortest"
    common = dict(crop_size=size, resize_size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    if mode == "squash":
        return Preprocessing(resize_mode="squash", crop_mode="none", interpolation=interpolation, **common)
    if mode == "longest":
        return Preprocessing(resize_mode="longer_round", fill=(int(cfg.get("fill_color", 0)),) * 3,
                             interpolation=interpolation, **common)
    if mode != "shortest":
        raise BackboneError(f"open_clip resize_mode {mode!r} is not one of shortest, longest, squash")
    if size[0] == size[1]:
        return Preprocessing(interpolation=interpolation, **common)
    return Preprocessing(resize_mode="shorter_round", interpolation="bicubic", **common)
