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
from typing import Sequence

from ..errors import HeadMismatchError, short
from ..images.decode import DecodePolicy
from ..store.format import FEATURES_VERSION, StoreIdentity
from ..views.augment import ViewPlan
from .runner import FileFeatures, TrunkRunner
from .settings import RunSettings
from .trunks import Backbone, load_backbone


def store_identity(backbone: Backbone, settings: RunSettings) -> StoreIdentity:
    """The identity of the features ``backbone`` makes under resolved ``settings``."""
    return StoreIdentity(backbone.name, backbone.node, backbone.weights.sha256, backbone.preprocessing.to_dict(),
                         settings.decode.to_dict(), settings.precision, settings.dtype, FEATURES_VERSION)


def recorded_settings(head_path: Path, metadata: dict, base: RunSettings, precision: str | None = None) -> RunSettings:
    """``base`` with the decode policy, precision and storage dtype the head's stores were made with
    (``precision`` overrides the recorded one); one run computes every backbone, so they must agree."""
    identities = [StoreIdentity.from_dict(record) for record in metadata["backbones"]]
    for record, identity in zip(metadata["backbones"][1:], identities[1:]):
        change = identity.difference(identities[0], StoreIdentity.RUN_FIELDS)
        if change:
            raise HeadMismatchError(f"{head_path}: {record['store_name']}'s features were made with other {change} "
                                    "than the first backbone's; one prediction run cannot reproduce both")
    first = identities[0]
    return dataclasses.replace(base, decode=DecodePolicy.from_dict(first.decode), dtype=first.dtype,
                               precision=precision or first.precision)


def check_backbone(head_path: Path, recorded: dict, backbone: Backbone, settings: RunSettings,
                   purpose: str = "predict") -> None:
    """Raise :class:`HeadMismatchError` unless ``backbone`` under ``settings`` makes the features
    ``recorded`` describes (its precision aside: :func:`recorded_settings` decided it); the message
    ends "refusing to ``purpose``"."""
    # the plain rows' identity: views stored beside them (augmented, test-time) do not change them
    expected = dataclasses.replace(StoreIdentity.from_dict(recorded).without_views(), precision=settings.precision)
    found = expected.difference(store_identity(backbone, settings))
    if found and found.field == "weights_sha256":
        raise HeadMismatchError(
            f"{head_path}: {recorded['store_name']} was trained on weights {recorded['weights']} (sha256 "
            f"{found.mine[:16]}) but {backbone.weights.name} from {backbone.weights.source} has sha256 "
            f"{found.theirs[:16]}; refusing to {purpose}")
    if found:
        raise HeadMismatchError(f"{head_path}: {recorded['store_name']} was trained with "
                                f"{found.field.replace('_', ' ')} {short(found.mine)} but this run makes "
                                f"{short(found.theirs)}; refusing to {purpose}")


def head_backbones(head_path: Path, metadata: dict, settings: RunSettings,
                   weights_paths: dict[str, str] | None = None, purpose: str = "predict") -> list[Backbone]:
    """Rebuild the head's backbones, each checked against what the head was trained on.

    Weights loaded from a file during extraction are loaded from the recorded path again, or from
    ``weights_paths[store_name]`` when given.
    """
    backbones = []
    for recorded in metadata["backbones"]:
        override = (weights_paths or {}).get(recorded["store_name"])
        from_file = override or (recorded["weights_source"] if recorded["weights"].startswith("file:") else None)
        backbone = load_backbone(recorded["backbone"], "DEFAULT" if from_file else recorded["weights"], from_file,
                                 recorded["node"])
        check_backbone(head_path, recorded, backbone, settings, purpose)
        backbones.append(backbone)
    return backbones



def recorded_features(source: Path, metadata: dict, files: Sequence[tuple[str, str]],
                      settings: RunSettings | None = None, weights_paths: dict[str, str] | None = None,
                      precision: str | None = None, label: str = "predict", plan: ViewPlan | None = None,
                      ) -> tuple[FileFeatures, RunSettings]:
    """Features of ``files`` ((OS path, name) pairs) as the stores ``metadata["backbones"]`` records
    describe would hold them (``source``: the head or store those records come from, for messages),
    and the resolved settings that made them; with a ``plan`` of several views, ``[N, views, D]``.
    Undecodable files are reported, not raised."""
    base = dataclasses.replace(settings or RunSettings(progress=False), on_error="skip")
    settings = recorded_settings(source, metadata, base, precision).resolved()
    if plan is not None and plan.count > 1 and settings.decode.backend != "pil":
        raise HeadMismatchError(f"{source}: its stores were decoded with {settings.decode.backend} (nvJPEG) and "
                                f"{plan.describe()} are cut from PIL-decoded images; extract with --decoder pil")
    backbones = head_backbones(source, metadata, settings, weights_paths)
    extracted = TrunkRunner(backbones, settings).embed(files, label, plan)
    extracted.features = {b.store_name: extracted.features[b.store_name] for b in backbones}
    return extracted, settings
