"""The MLP head of the recipe (seed 003): Dropout, Linear, ReLU, Dropout, Linear, trained with Adam in torch."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..devices import PRECISIONS, auto_precision, resolve_device, torch_dtype
from ..errors import SettingsError
from . import selection
from ._calibration import accuracies
from .base import Head
from .settings import MLP

__all__ = ["Dropout", "MLPHead", "build_mlp"]


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks come from 16 random bits per element, drawn 64 at a time.

    On a CPU, torch's ``bernoulli_`` draws one number per element: on the recipe's input (5,000 x
    2,560 per epoch) that was half of a bf16 MLP epoch (172 of 333 ms; 13 ms this way). An element is
    dropped with probability ``round(p * 65536) / 65536`` (exactly ``p`` for 0.5), survivors scaled
    by ``1 / (1 - p)``; other devices, and eval mode, are ``nn.Dropout``'s. Same seed, same masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or self.p in (0.0, 1.0) or x.numel() % 4:
            return super().forward(x)
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (x.numel() // 4,), dtype=torch.int64, device=x.device)
        kept = bits.view(torch.int16).view(x.shape) >= round(self.p * 65536) - 32768
        return x * kept.to(x.dtype) * (1.0 / (1.0 - self.p))


def build_mlp(in_features: int, hidden_sizes: tuple[int, ...], n_classes: int, dropout: float) -> nn.Sequential:
    """The recipe's head: (Dropout, Linear, ReLU) per hidden size, then Dropout, Linear(., C)."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden_sizes:
        layers += [Dropout(dropout), nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    return nn.Sequential(*layers, Dropout(dropout), nn.Linear(width, n_classes))


class MLPHead(Head):
    """The recipe's MLP (Dropout 0.5, Linear(D,1000), ReLU, Dropout 0.5, Linear(1000,C)), Adam.

    With validation rows: each ``weight_decay_grid`` value trains until ``patience`` epochs in a row
    have not changed what rule ``select`` keeps among its epochs so far, and the weights of the last
    epoch it kept when that epoch ran are kept (an epoch is chosen as it ends; the rule's later view
    of earlier epochs does not bring back weights that were not stored). ``history_`` has one dict per
    epoch of the kept candidate: train_loss, val_accuracy, val_balanced_accuracy, val_log_loss, seconds.
    Training runs on ``device`` in ``precision`` (``auto``: bf16 autocast where the device computes
    bf16 natively, CUDA or a CPU with AVX512-BF16/AMX, 5-6x faster epochs there at equal accuracy;
    fp32 elsewhere), recorded in ``precision_``; weights and Adam's state stay float32, and the
    fitted module computes in float32. The fitted module lives on the CPU. ``fit(..., views=)``: other
    views of the training rows (augmented features, float32[N, K, D]); each epoch then trains on
    one of the K + 1 views of each row, the plain one among them, drawn with the batch order's generator.
    """

    kind = "mlp"
    grid_param = "weight_decay"
    limits = {"hidden_sizes": (1, True), "dropout": (0, True), "lr": (0, False), "batch_size": (1, True),
              "max_epochs": (1, True), "patience": (1, True), "weight_decay": (0, True), "weight_decay_grid": (0, True)}
    auto_params = frozenset({"batch_size"})
    choices = {**Head.choices, "precision": ("auto", *PRECISIONS)}

    def __init__(self, hidden_sizes=MLP.hidden_sizes, dropout: float = 0.5, lr: float = MLP.lr,
                 batch_size: int | str = MLP.batch_size, max_epochs: int = MLP.max_epochs, patience: int = MLP.patience,
                 weight_decay: float = 0.0, weight_decay_grid=(0.0, 1e-4, 1e-3), device: str = MLP.device,
                 seed: int = MLP.seed, precision: str = "auto", select: str = selection.SELECT,
                 class_weight: str | None = None, standardize: bool = True):
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.weight_decay = weight_decay
        self.weight_decay_grid = weight_decay_grid
        self.device = device
        self.seed = seed
        self.precision = precision
        self.select = select
        self.class_weight = class_weight
        self.standardize = standardize

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
            views: np.ndarray | None = None) -> "MLPHead":
        """:meth:`Head.fit`; ``views``: float32[N, K, D], K other views of each row of ``X`` (see the class)."""
        if views is not None:
            views = np.asarray(views, dtype=np.float32)
            if views.ndim != 3 or views.shape[0] != len(X) or views.shape[2] != np.shape(X)[1]:
                raise SettingsError(f"mlp head: views must be [N, K, D] = [{len(X)}, K, {np.shape(X)[1]}], "
                                    f"not {list(views.shape)}")
        self._views = views  # for _fit_one only: never kept in the fitted head
        try:
            return super().fit(X, y, X_val, y_val)
        finally:
            del self._views

    def _select(self, train, validation):
        X, t, weights = train
        views = getattr(self, "_views", None)
        if views is not None:  # [N, K + 1, D], plain first, standardised as X was; once for every candidate
            X = np.concatenate([X[:, None], self._scale(views.reshape(-1, X.shape[1])).reshape(views.shape)], 1)
        device = resolve_device(self.device)
        self.precision_ = auto_precision(device) if self.precision == "auto" else self.precision
        return super()._select((X, t, weights), validation)

    def _fit_one(self, X, t, weights, validation, value):
        """``X``: float32[N, D], or [N, K + 1, D] with the views (:meth:`_select`)."""
        device = torch.device(resolve_device(self.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # same init and dropout masks for every candidate and run
            model = build_mlp(X.shape[-1], tuple(self.hidden_sizes), len(self.classes_), self.dropout).to(device)
            # rows in the compute dtype once, not per batch: autocast would cast each batch after the input
            # dropout, whose masks and 1 / (1 - p) then run in half the bytes (a CPU bf16 epoch at 5,000 x
            # 2,560: 0.164 -> 0.156 s)
            rows = self._compute_dtype() or torch.float32
            train = (torch.from_numpy(X).to(device, rows), torch.from_numpy(t).to(device),
                     None if weights is None else torch.from_numpy(weights).to(device))
            if validation is not None:
                validation = (torch.from_numpy(validation[0]).to(device, rows),
                              torch.from_numpy(validation[1]).to(device))
            return self._train(model, *train, validation, value)

    def _compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype of :attr:`precision_`, or None for float32."""
        return None if self.precision_ == "fp32" else torch_dtype(self.precision_)

    def _train(self, model: nn.Module, X: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None,
               validation: tuple[torch.Tensor, torch.Tensor] | None, weight_decay: float):
        """``X``: [N, D], or [N, V, D] views of each row, one drawn per row and epoch, in the compute
        dtype (float32 or bf16/fp16 under autocast), as ``validation``'s rows; ``t`` int64[N]."""
        # fused: one kernel per step for all parameters (the step is a fifth of a CPU epoch at 2.6M weights)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=weight_decay, fused=True)
        order = torch.Generator().manual_seed(self.seed)
        compute = self._compute_dtype()
        if validation is not None:
            X_val, t_val = validation
        history, best_state, stale = [], None, 0
        for epoch in range(self.max_epochs):
            start = time.perf_counter()
            rows = X
            if X.ndim == 3:  # this epoch's view of each row
                chosen = torch.randint(X.shape[1], (len(X),), generator=order).to(X.device)
                rows = X[torch.arange(len(X), device=X.device), chosen]
            train_loss = train_epoch(model, optimizer, rows, t, self.batch_size_for(len(X)), order, weights, compute)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": time.perf_counter() - start}
            if validation is not None:
                record.update(epoch_scores(model, X_val, t_val, compute))
            history.append(record)
            if validation is not None:
                if selection.choose(history, self.select, len(t_val)) == epoch:
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                stale = 0 if selection.improved(history, self.select, len(t_val)) else stale + 1
                if stale >= self.patience:
                    break
        model = model.to("cpu").eval()
        if best_state is not None:
            model.load_state_dict(best_state)
        return model, history

    def batch_size_for(self, n_rows: int) -> int:
        """``batch_size``, or for ``"auto"`` the largest of 256, 128 that still gives 16 optimizer steps
        per epoch, else 64: big batches where a CPU epoch is compute-bound (5,000 x 2,560 rows: half the
        seconds of batch 64), enough steps per epoch where a set has a few hundred images."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        return next((size for size in (256, 128) if n_rows // size >= 16), 64)

    @torch.no_grad()
    def _model_proba(self, model: nn.Module, X: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        proba = [F.softmax(model(torch.from_numpy(X[i:i + 4096]).to(device)).double(), dim=1).cpu()
                 for i in range(0, len(X), 4096)]  # float64 softmax: rows sum to 1 within float64 rounding
        model.train(was_training)
        return torch.cat(proba).numpy()

    def _model_arrays(self):
        state = {name: tensor.numpy() for name, tensor in self.model_.state_dict().items()}
        return state, {"in_features": int(self.n_features_in_), "hidden_sizes": [int(s) for s in self.hidden_sizes],
                       "n_classes": len(self.classes_), "dropout": float(self.dropout)}

    def _model_from_arrays(self, arrays, values):
        model = build_mlp(int(values["in_features"]), tuple(int(s) for s in values["hidden_sizes"]),
                          int(values["n_classes"]), float(values["dropout"]))
        model.load_state_dict({name: torch.from_numpy(array) for name, array in arrays.items()})
        return model.eval()


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, t: torch.Tensor,
                batch_size: int, generator: torch.Generator, weights: torch.Tensor | None = None,
                compute: torch.dtype | None = None) -> float:
    """One pass over float32[N, D] / int64[N] tensors in a random order; returns the mean loss.

    ``weights``: float32[N] row weights (each batch's loss is their weighted mean), or None.
    ``compute``: the forward pass (and so the backward's products) under autocast to this dtype
    (bf16), or None: float32. The loss is accumulated on the device and read once, so a GPU never
    waits per batch.
    """
    model.train()
    order = torch.randperm(len(X), generator=generator).to(X.device)
    total = torch.zeros((), device=X.device)
    for begin in range(0, len(X), batch_size):
        batch = order[begin:begin + batch_size]
        with torch.autocast(X.device.type, dtype=compute or torch.bfloat16, enabled=compute is not None):
            logits = model(X[batch])
        if weights is None:
            loss = F.cross_entropy(logits.float(), t[batch])
        else:
            rows = F.cross_entropy(logits.float(), t[batch], reduction="none")
            loss = (rows * weights[batch]).sum() / weights[batch].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(batch)
    return float(total) / len(X)


@torch.no_grad()
def epoch_scores(model: nn.Module, X: torch.Tensor, t: torch.Tensor, compute: torch.dtype | None) -> dict[str, float]:
    """Validation accuracy, balanced accuracy and log loss after an epoch: the forward pass in
    ``compute`` (as training), probabilities clipped at ``PROBABILITY_FLOOR`` as
    :func:`~featurekit.heads.base.proba_scores`."""
    model.eval()
    log_p = []
    for begin in range(0, len(X), 4096):
        with torch.autocast(X.device.type, dtype=compute or torch.bfloat16, enabled=compute is not None):
            log_p.append(torch.log_softmax(model(X[begin:begin + 4096]).float(), dim=1))
    model.train()
    log_p = torch.cat(log_p)
    return {**accuracies(log_p, t),
            "val_log_loss": float(-log_p.gather(1, t[:, None]).clamp_min(math.log(selection.PROBABILITY_FLOOR))
                                  .double().mean())}
