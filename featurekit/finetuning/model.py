"""The model ``featurekit finetune`` trains: a head's trunks, its standardisation and its classifier, in torch.

``uint8 views -> normalise (the weights' own) -> trunks (in the head's column order) -> features
rounded to the store's dtype -> (x - mean) / std (the head's scaler, fixed) -> classifier -> log-probabilities``.

Before the first step the model is the head on the features extract stores, so its probabilities
equal the head's (:func:`head_layers` rebuilds each head kind exactly; tested):

- ``mlp``: its ``nn.Sequential``, dropout included (on while training, as the head was trained);
- ``logreg``: ``Linear(D, C)`` from the fit's ``coef``/``intercept`` and a log-softmax;
- ``svm``: its probabilities *are* the head, ``softmax(T * (x . coef + intercept))`` with the fitted
  inverse temperature ``T``: the same ``Linear(D, C)`` and log-softmax, weights and bias multiplied
  by ``T``. Fine-tuning minimises the log loss of these probabilities: the squared hinge and the
  temperature's own fit play no part in it any more;
- ``knn`` has no gradient to follow and is refused.

Rounding the features to the store's dtype is a straight-through cast (its gradient is the
identity); it keeps the head's input what the head was fitted on.

**Trunks.** Each runs its eval graph (``create_feature_extractor`` traces train and eval graphs;
the train graph would switch on drop-connect and dropout traced into frozen blocks). ``--unfreeze
NODE`` makes trainable every module and parameter the graph uses from the first use of ``NODE``
(a module path such as ``layer4``, ``features.28``, ``_blocks.15``) on; ``all`` the whole trunk,
``none`` nothing. The frozen part is prepared by extraction's own function
(:func:`featurekit.backbones.runner.fold_and_cast`): BatchNorm folded into the convolution before it, weights
cast to the compute precision, so with ``none`` the trunk computes exactly what extract computed.
In the unfrozen part, modules follow ``train()``/``eval()``, except BatchNorm, which by default
stays in eval mode (running statistics frozen, scale and shift trained; ``batchnorm="train"``
updates the statistics): see docs/finetune.md for why.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..backbones.runner import fold_and_cast
from ..backbones.trunks import Backbone
from ..devices import torch_dtype
from ..errors import FinetuneError
from ..heads.base import Head
from ..heads.mlp import build_mlp
from .settings import BATCHNORM_MODES, FINETUNABLE_HEADS

__all__ = ["FinetuneModel", "build_head_layers", "head_layers", "unfrozen_part"]

# --------------------------------------------------------------------------- the head as layers


class Standardize(nn.Module):
    """``(x - mean) / scale`` with the head's fitted scaler (buffers, never trained): float32[B, D]."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("scale", scale.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale


def build_head_layers(spec: Mapping) -> nn.Sequential:
    """Standardize -> classifier -> log-probabilities, shaped by ``spec`` (:func:`head_layers`), values unset."""
    dim, classes = spec["in_features"], spec["n_classes"]
    scale = Standardize(torch.zeros(dim), torch.ones(dim))
    if spec["kind"] == "mlp":
        return nn.Sequential(scale, build_mlp(dim, tuple(spec["hidden_sizes"]), classes, spec["dropout"]),
                             nn.LogSoftmax(dim=1))
    return nn.Sequential(scale, nn.Linear(dim, classes), nn.LogSoftmax(dim=1))  # logreg, svm


def head_layers(head: Head, head_path: object) -> tuple[dict, nn.Sequential]:
    """``(spec, layers)``: the head as torch layers giving its ``predict_proba`` (as log-probabilities)."""
    if head.kind not in FINETUNABLE_HEADS:
        raise FinetuneError(f"{head_path}: a {head.kind} head cannot be fine-tuned (no gradient to follow); "
                            f"heads that can: {', '.join(FINETUNABLE_HEADS)}")
    classes = len(head.classes_)
    spec = {"kind": head.kind, "in_features": int(head.n_features_in_), "n_classes": classes}
    if head.kind == "mlp":
        spec.update(hidden_sizes=list(head.hidden_sizes), dropout=float(head.dropout))
    layers = build_head_layers(spec)
    if head.scaler_ is not None:
        layers[0] = Standardize(torch.from_numpy(head.scaler_.mean_), torch.from_numpy(head.scaler_.scale_))
    with torch.no_grad():
        if head.kind == "mlp":
            layers[1].load_state_dict(head.model_.state_dict())
        else:  # a LinearFit; logreg has no temperature
            fit = head.model_
            scale = 1.0 if fit.temperature is None else fit.temperature
            layers[1].weight.copy_(fit.coef.double() * scale)
            layers[1].bias.copy_(fit.intercept.double() * scale)
    return spec, layers


# --------------------------------------------------------------------------- trunks


@dataclass
class TrunkPart:
    """Which part of one trunk trains: ``modules`` (names in its graph module) and ``parameters``."""

    unfreeze: str
    modules: set[str]
    parameters: set[str]
    recursive: bool = True  # train()/eval() of a listed module reaches its children (graph leaves) or not

    def trains(self, name: str) -> bool:
        """Whether state entry ``name`` of the trunk (a parameter, or a buffer of a module) is trained."""
        return name in self.parameters or name.rpartition(".")[0] in self.modules


def unfrozen_part(body: nn.Module, unfreeze: str, store_name: str) -> TrunkPart:
    """What trains when ``unfreeze`` (none, all, or a module path) is the first trainable module of ``body``."""
    if not isinstance(body, fx.GraphModule):
        return _module_part(body, unfreeze, store_name)
    uses = [node for node in body.graph.nodes if node.op in ("call_module", "get_attr")]
    if unfreeze == "none":
        start = len(uses)
    elif unfreeze == "all":
        start = 0
    else:
        start = next((i for i, node in enumerate(uses) if node.target == unfreeze
                      or node.target.startswith(unfreeze + ".")), None)
        if start is None:
            names = sorted({".".join(n.target.split(".")[:depth]) for n in uses
                            for depth in range(1, n.target.count(".") + 2)})
            close = difflib.get_close_matches(unfreeze, names, n=5)
            raise FinetuneError(f"{store_name}: no module {unfreeze!r} before its feature node; close: "
                                f"{', '.join(close) or 'none'} (or none, all)")
    modules, parameters = set(), set()
    for node in uses[start:]:
        if node.op == "call_module":
            modules.add(node.target)
            parameters |= {name for name, _ in body.get_submodule(node.target).named_parameters(node.target)}
        elif _is_parameter(body, node.target):  # functional layers (F.conv2d(x, self.weight)) read their weights
            modules.add(node.target.rpartition(".")[0])
            parameters.add(node.target)
    return TrunkPart(unfreeze, modules, parameters)


def _module_part(body: nn.Module, unfreeze: str, store_name: str) -> TrunkPart:
    """The same for another library's model, run by its own forward (no graph): its modules in the
    order they are registered, which is the order the supported families run them (timm ``blocks.N``,
    ``stages.N``; transformers ``encoder.layer.N``, ``layers.N``; open_clip ``transformer.resblocks.N``).
    The model's own parameters (class token, position embeddings, open_clip's ``proj``) train with
    ``all`` only."""
    names = [name for name, _ in body.named_modules() if name]
    start = {"none": len(names), "all": 0}.get(unfreeze, names.index(unfreeze) if unfreeze in names else None)
    if start is None:
        close = difflib.get_close_matches(unfreeze, names, n=5)
        raise FinetuneError(f"{store_name}: no module {unfreeze!r}; close: {', '.join(close) or 'none'} (or none, all)")
    modules = set(names[start:]) | ({""} if unfreeze == "all" else set())
    parameters = {f"{module}.{name}".lstrip(".") for module in modules
                  for name, _ in body.get_submodule(module).named_parameters(recurse=False)}
    return TrunkPart(unfreeze, modules, parameters, recursive=False)


def _is_parameter(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in module.get_submodule(owner)._parameters


# --------------------------------------------------------------------------- the model


class FinetuneModel(nn.Module):
    """uint8 views ``{preprocessing key: uint8[B, 3, H, W]}`` -> log-probabilities float32[B, C].

    ``backbones`` are the head's, in its column order (their trunks are taken over, not copied);
    ``unfreeze[store_name]``: none, all or a module path; ``precision``: the compute precision of
    the trunks (the head runs in fp32); ``storage_dtype``: the store's feature dtype.
    """

    def __init__(self, backbones: Sequence[Backbone], layers: nn.Sequential, unfreeze: Mapping[str, str],
                 precision: str, storage_dtype: str, batchnorm: str = "frozen", channels_last: bool = True):
        super().__init__()
        if batchnorm not in BATCHNORM_MODES:
            raise FinetuneError(f"unknown batchnorm mode {batchnorm!r} (choose from {', '.join(BATCHNORM_MODES)})")
        self.store_names = [b.store_name for b in backbones]
        self.preprocessings = {b.preprocessing.key: b.preprocessing for b in backbones}
        self.inputs = [b.preprocessing.key for b in backbones]
        self.compute_dtype = torch_dtype(precision)
        self.storage_dtype = getattr(torch, storage_dtype)
        self.batchnorm_train = batchnorm == "train"
        self.channels_last = channels_last
        self.original_states = []  # each trunk's tensors as built (frozen ones are never changed)
        self.parts: list[TrunkPart] = []
        for backbone in backbones:
            body = backbone.trunk.body
            self.original_states.append(dict(body.state_dict()))
            self.parts.append(unfrozen_part(body, unfreeze.get(backbone.store_name, "none"), backbone.store_name))
            part = self.parts[-1]
            backbone.trunk.body = fold_and_cast(body, self.compute_dtype, part.modules, part.parameters)
        self.trunks = nn.ModuleList([b.trunk for b in backbones])
        self.head = layers
        if channels_last:
            self.trunks.to(memory_format=torch.channels_last)
        self.train(False)

    def forward(self, views: Mapping[str, torch.Tensor]) -> torch.Tensor:
        device = next(iter(views.values())).device
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        low = self.compute_dtype != torch.float32
        with torch.autocast(device.type, dtype=self.compute_dtype, enabled=low):
            inputs = {key: p.normalize(views[key]).contiguous(memory_format=memory_format)
                      for key, p in self.preprocessings.items()}
            features = [trunk(inputs[key]) for trunk, key in zip(self.trunks, self.inputs)]
        with torch.autocast(device.type, enabled=False):
            return self.head(torch.cat([f.to(self.storage_dtype).float() for f in features], dim=1))

    def train(self, mode: bool = True) -> "FinetuneModel":
        """The head follows ``mode``; in each trunk only the unfrozen modules do, BatchNorm as configured."""
        self.training = mode
        self.head.train(mode)
        for trunk, part in zip(self.trunks, self.parts):
            trunk.eval()
            for name in part.modules:
                module = trunk.body.get_submodule(name)
                if isinstance(module, _BatchNorm) and not self.batchnorm_train:
                    continue
                if part.recursive:
                    module.train(mode)
                else:  # every module of the part is listed: each follows mode alone
                    module.training = mode
        return self

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [p for trunk in self.trunks for p in trunk.parameters() if p.requires_grad]

    def mutable_state(self) -> dict[str, torch.Tensor]:
        """What training can change: the head's tensors and the unfrozen part of each trunk (CPU copies)."""
        names = self._mutable_names()
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.state_dict().items()
                if name in names}

    def load_mutable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = self._mutable_names()
        if set(state) != expected:
            differ = len(set(state) ^ expected)
            raise FinetuneError(f"checkpoint state does not fit the model ({differ} tensors differ)")
        self.load_state_dict(state, strict=False)

    def trunk_state(self, index: int) -> dict[str, torch.Tensor]:
        """Trunk ``index``'s tensors under the architecture's own names, the trained ones included:
        a state dict ``extract --weights-path`` loads."""
        trained = self.trunks[index].body.state_dict()
        part = self.parts[index]
        return {name: (trained[name] if part.trains(name) else tensor).detach().to("cpu", copy=True).contiguous()
                for name, tensor in self.original_states[index].items()}

    def _mutable_names(self) -> set[str]:
        names = {f"head.{name}" for name in self.head.state_dict()}
        for index, part in enumerate(self.parts):
            for name in self.trunks[index].body.state_dict():
                if part.trains(name):
                    names.add(f"trunks.{index}.body.{name}")
        return names
