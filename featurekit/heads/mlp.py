"""The MLP head of the recipe (seed 003): Dropout, Linear, ReLU, Dropout, Linear, trained with Adam in torch."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..devices import resolve_device
from ..errors import SettingsError
from . import solver
from .base import Head
from .settings import MLP


def build_mlp(in_features: int, hidden_sizes: tuple[int, ...], n_classes: int, dropout: float) -> nn.Sequential:
    """The recipe's head: (Dropout, Linear, ReLU) per hidden size, then Dropout, Linear(., C)."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden_sizes:
        layers += [nn.Dropout(dropout), nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    return nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(width, n_classes))


class MLPHead(Head):
    """The recipe's MLP (Dropout 0.5, Linear(D,1000), ReLU, Dropout 0.5, Linear(1000,C)), Adam.

    With validation rows: each ``weight_decay_grid`` value trains until the validation score has
    not improved for ``patience`` epochs, and its best epoch's weights are kept. ``history_`` has
    one dict per epoch of the kept candidate: train_loss, val_accuracy, val_log_loss, seconds.
    Training runs on ``device``; the fitted module lives on the CPU. ``fit(..., views=)``: other
    views of the training rows (augmented features, float32[N, K, D]); each epoch then trains on
    one of the K + 1 views of each row, the plain one among them, drawn with the batch order's generator.
    """

    kind = "mlp"
    grid_param = "weight_decay"
    limits = {"hidden_sizes": (1, True), "dropout": (0, True), "lr": (0, False), "batch_size": (1, True),
              "max_epochs": (1, True), "patience": (1, True), "weight_decay": (0, True), "weight_decay_grid": (0, True)}
    auto_params = frozenset({"batch_size"})

    def __init__(self, hidden_sizes=MLP.hidden_sizes, dropout: float = 0.5, lr: float = MLP.lr,
                 batch_size: int | str = MLP.batch_size, max_epochs: int = MLP.max_epochs, patience: int = MLP.patience,
                 weight_decay: float = 0.0, weight_decay_grid=(0.0, 1e-4, 1e-3), device: str = MLP.device,
                 seed: int = MLP.seed, standardize: bool = True):
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
        X, t = train
        views = getattr(self, "_views", None)
        if views is not None:  # [N, K + 1, D], plain first, standardised as X was; once for every candidate
            X = np.concatenate([X[:, None], self._scale(views.reshape(-1, X.shape[1])).reshape(views.shape)], 1)
        return super()._select((X, t), validation)

    def _fit_one(self, X, t, validation, value):
        """``X``: float32[N, D], or [N, K + 1, D] with the views (:meth:`_select`)."""
        device = torch.device(resolve_device(self.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # same init and dropout masks for every candidate and run
            model = build_mlp(X.shape[-1], tuple(self.hidden_sizes), len(self.classes_), self.dropout).to(device)
            return self._train(model, torch.from_numpy(X).to(device), torch.from_numpy(t).to(device), validation, value)

    def _train(self, model: nn.Module, X: torch.Tensor, t: torch.Tensor, validation, weight_decay: float):
        """``X``: float32[N, D], or [N, V, D] views of each row, one drawn per row and epoch."""
        # fused: one kernel per step for all parameters (the step is a fifth of a CPU epoch at 2.6M weights)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=weight_decay, fused=True)
        order = torch.Generator().manual_seed(self.seed)
        history, best, best_state, stale = [], None, None, 0
        for epoch in range(self.max_epochs):
            start = time.perf_counter()
            rows = X
            if X.ndim == 3:  # this epoch's view of each row
                chosen = torch.randint(X.shape[1], (len(X),), generator=order).to(X.device)
                rows = X[torch.arange(len(X), device=X.device), chosen]
            train_loss = train_epoch(model, optimizer, rows, t, self.batch_size_for(len(X)), order)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": time.perf_counter() - start}
            if validation is not None:
                record.update(self._scores(model, validation))
                score = solver.selection_score(record)
                if best is None or score > best:
                    best, stale = score, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    stale += 1
            history.append(record)
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
                batch_size: int, generator: torch.Generator) -> float:
    """One pass over float32[N, D] / int64[N] tensors in a random order; returns the mean loss.

    The loss is accumulated on the device and read once, so a GPU never waits per batch.
    """
    model.train()
    order = torch.randperm(len(X), generator=generator).to(X.device)
    total = torch.zeros((), device=X.device)
    for begin in range(0, len(X), batch_size):
        batch = order[begin:begin + batch_size]
        loss = F.cross_entropy(model(X[batch]), t[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(batch)
    return float(total) / len(X)
