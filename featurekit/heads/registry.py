"""The head kinds by name: what ``train-head --head KIND`` builds."""

from __future__ import annotations

from ..errors import SettingsError
from .base import Head
from .knn import KNNHead
from .linear import LinearSVMHead, LogisticHead
from .mlp import MLPHead
from .settings import HEAD_KINDS

__all__ = ["HEADS", "make_head", "make_heads"]

HEADS: dict[str, type[Head]] = {cls.kind: cls for cls in (MLPHead, LogisticHead, LinearSVMHead, KNNHead)}
assert tuple(HEADS) == HEAD_KINDS, "heads.settings.HEAD_KINDS names the heads registered here, in order"


def make_head(kind: str, **params) -> Head:
    """A head of ``kind`` (mlp, logreg, svm, knn). A parameter it does not take is a :class:`SettingsError`."""
    return make_heads([kind], params)[0]


def make_heads(kinds: list[str], params: dict) -> list[Head]:
    """One head per kind, each given the ``params`` it takes; a parameter none of them takes is a
    :class:`SettingsError` (an option silently ignored would make a run mean something else)."""
    unknown = [kind for kind in kinds if kind not in HEADS]
    if unknown:
        raise SettingsError(f"unknown head {unknown[0]!r} (choices: {', '.join(HEADS)})")
    accepted = {kind: HEADS[kind]().get_params() for kind in kinds}
    unused = [name for name in params if not any(name in taken for taken in accepted.values())]
    if unused:
        takes = "; ".join(f"{kind}: {', '.join(sorted(taken))}" for kind, taken in accepted.items())
        raise SettingsError(f"{' or '.join(kinds)} head takes no parameter {unused[0]!r} ({takes})")
    return [HEADS[kind](**{k: v for k, v in params.items() if k in accepted[kind]}) for kind in kinds]
