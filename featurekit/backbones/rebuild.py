"""Rebuild the trunks that made a store's or a head's features, and prove they still make them.

A store records the identity of its features (:class:`~featurekit.store.format.StoreIdentity`:
backbone, node, weights sha256, preprocessing, decode policy, precision, dtype, features version);
a head records its stores' identities, one per backbone, with where the weights came from. To make
the same rows for new images (predict, neighbors, fine-tuning), each backbone is rebuilt from that
record and run by a :class:`~featurekit.backbones.runner.TrunkRunner` under the recorded decode
policy, precision and storage dtype; the identity the rebuilt trunk would record is compared with
the recorded one, and any difference (other weights, preprocessing, node, ...) is refused in one
line, since features from another trunk look like features and give confident, wrong answers.
Only ``precision`` may be overridden, on request.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import HeadMismatchError, short
from ..images.decode import DecodePolicy
from ..store.format import FEATURES_VERSION, RANDOM, BackboneRecord, StoreIdentity, warn_random
from ..views.augment import ViewPlan
from .runner import FileFeatures, TrunkRunner
from .settings import RunSettings
from .trunks import Backbone, load_backbone
from .weights import weights_files

__all__ = ["check_identity", "load_recorded", "recorded_backbones", "recorded_features", "recorded_settings",
           "store_identity"]


def store_identity(backbone: Backbone, settings: RunSettings) -> StoreIdentity:
    """The identity of the features ``backbone`` makes under resolved ``settings``."""
    return StoreIdentity(backbone.name, backbone.node, backbone.weights.sha256, backbone.preprocessing.to_dict(),
                         settings.decode.to_dict(), settings.precision, settings.dtype, FEATURES_VERSION,
                         source=backbone.source)


def recorded_settings(source: Path, records: Sequence[BackboneRecord], base: RunSettings,
                      precision: str | None = None) -> RunSettings:
    """``base`` with the decode policy, precision and storage dtype the recorded stores were made with
    (``precision`` overrides the recorded one); one run computes every backbone, so they must agree.
    ``source``: the head, model or store the records come from, for messages."""
    for record in records[1:]:
        change = record.identity.difference(records[0].identity, StoreIdentity.PLAIN_RUN_FIELDS)  # views aside
        if change:
            raise HeadMismatchError(f"{source}: {record.store_name}'s features were made with other {change} "
                                    "than the first backbone's; one prediction run cannot reproduce both")
    first = records[0]
    return dataclasses.replace(base, decode=DecodePolicy.from_dict(first.decode), dtype=first.dtype,
                               precision=precision or first.precision)


def check_backbone(source: Path, record: BackboneRecord, backbone: Backbone, settings: RunSettings,
                   purpose: str = "predict") -> None:
    """Raise :class:`HeadMismatchError` unless ``backbone`` under ``settings`` makes the features
    ``record`` describes (its precision aside: :func:`recorded_settings` decided it); the message
    ends "refusing to ``purpose``"."""
    check_identity(source, record, store_identity(backbone, settings), "this run makes",
                   f"{backbone.weights.name} from {backbone.weights.source}", purpose, ignore=("precision",))


def check_identity(source: Path, record: BackboneRecord, found: StoreIdentity, maker: str, weights_of: str,
                   purpose: str = "predict", ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`HeadMismatchError` unless the features of identity ``found`` (a rebuilt trunk's, or a
    store's) are those ``record`` describes, fields ``ignore`` aside. Messages: "<field> X but ``maker`` Y",
    "weights ... but ``weights_of`` has sha256 ...", ending "refusing to ``purpose``"."""
    # the plain rows' identity: views stored beside them (augmented, test-time) do not change them
    expected = dataclasses.replace(record.identity.without_views(), **{name: getattr(found, name) for name in ignore})
    change = expected.difference(found.without_views())
    if change and change.field == "weights_sha256":
        raise HeadMismatchError(
            f"{source}: {record.store_name} was trained on weights {record.weights} (sha256 "
            f"{change.mine[:16]}) but {weights_of} has sha256 {change.theirs[:16]}; refusing to {purpose}")
    if change:
        raise HeadMismatchError(f"{source}: {record.store_name} was trained with "
                                f"{change.field.replace('_', ' ')} {short(change.mine)} but {maker} "
                                f"{short(change.theirs)}; refusing to {purpose}")


def load_recorded(name: str, node: str, source: dict | None, weights: str, weights_path: str | None) -> Backbone:
    """The backbone a store's identity names (``name``, ``node``, ``source``), built again with
    ``weights`` or the file ``weights_path``; another library's keeps its pool and model arguments."""
    source = source or {}
    pool = source.get("pool", "default")  # such a backbone's node is its pool, unless --node was given
    return load_backbone(name, weights, weights_path, None if node == pool else node, pool, source.get("kwargs"))


def recorded_backbones(source: Path, records: Sequence[BackboneRecord], settings: RunSettings,
                       weights_paths: Mapping[str, str] | Sequence[str] | None = None,
                       purpose: str = "predict") -> list[Backbone]:
    """Rebuild the recorded backbones, each checked against what it made then.

    Weights loaded from a file during extraction are loaded from the recorded path again, or from
    the file ``weights_paths`` gives for its store (:func:`~featurekit.backbones.weights.weights_files`).
    """
    files = weights_files(weights_paths, [record.store_name for record in records])
    backbones = []
    for record in records:
        from_file = files.get(record.store_name) or (record.weights_source if record.weights.startswith("file:")
                                                      else None)
        backbone = load_recorded(record.backbone, record.node, record.source, "DEFAULT" if from_file else
                                 record.weights, from_file)
        check_backbone(source, record, backbone, settings, purpose)
        backbones.append(backbone)
    return backbones


def recorded_features(source: Path, records: Sequence[BackboneRecord], files: Sequence[tuple[str, str]],
                      settings: RunSettings | None = None, weights_paths: Mapping[str, str] | None = None,
                      precision: str | None = None, label: str = "predict", plan: ViewPlan | None = None,
                      ) -> tuple[FileFeatures, RunSettings]:
    """Features of ``files`` ((OS path, name) pairs) as the stores ``records`` describe would hold
    them (``source``: the head or store those records come from, for messages), and the resolved
    settings that made them; with a ``plan`` of several views, ``[N, views, D]``. Undecodable files
    are reported, not raised."""
    base = dataclasses.replace(settings or RunSettings(progress=False), on_error="skip")
    settings = recorded_settings(source, records, base, precision).resolved()
    if plan is not None and plan.count > 1 and settings.decode.backend != "pil":
        raise HeadMismatchError(f"{source}: its stores were decoded with {settings.decode.backend} (nvJPEG) and "
                                f"{plan.describe()} are cut from PIL-decoded images; extract with --decoder pil")
    backbones = recorded_backbones(source, records, settings, weights_paths)
    warn_random([b.store_name for b in backbones if b.weights.name == RANDOM])
    extracted = TrunkRunner(backbones, settings).embed(files, label, plan)
    extracted.features = {b.store_name: extracted.features[b.store_name] for b in backbones}
    return extracted, settings
