"""What ``featurekit info`` tells of a store: rows, classes, backbone, weights, how it was made."""

from __future__ import annotations

import json
import os
from collections import Counter

from .format import RANDOM, read_store, warn_random

__all__ = ["describe_store"]


def describe_store(path: str | os.PathLike, as_json: bool = False) -> list[str]:
    """Lines describing the store at ``path`` (``as_json``: one line, its attributes, rows and classes
    as JSON). Features of random weights are warned of."""
    contents = read_store(path, features=False)
    header = contents.header
    if header.weights == RANDOM:
        warn_random([str(path)])
    if as_json:
        return [json.dumps({"path": str(path), **header.to_dict(), "rows": len(contents.paths),
                            "classes": contents.classes})]
    counts = Counter(contents.classes[label] for label in contents.labels) if contents.labels is not None else None
    listed = f", listed by {json.dumps(header.listing_rule, sort_keys=True)}" if header.listing_rule else ""
    lines = [f"{path}", f"  split {header.split} of {header.data_root}{listed}",
             f"  backbone {header.backbone} node {header.node}: features {header.dtype}[{len(contents.paths)}, "
             f"{header.feature_dim}]"]
    if header.source:  # another library's backbone
        source = header.source
        lines.append(f"  from {source.get('library')} {source.get('version')}: model {source.get('model')} tag "
                     f"{source.get('tag')}, pool {source.get('pool')}"
                     + (f" ({source.get('output')})" if source.get("output") != source.get("pool") else "")
                     + ", config sha256 "
                     f"{str(source.get('config_sha256'))[:16]}")
    if header.extra_datasets:
        shapes = header.feature_shapes(len(contents.paths))
        about = {"features_aug": f"{header.augment_views} augmented views, policy "
                                 f"{(header.augment_policy or {}).get('name')}, seed {header.augment_seed}",
                 "features_tta": f"{header.tta} test-time views"}
        lines.append("  views: " + ", ".join(f"{name} {header.dtype}{list(shapes[name])} ({about[name]})"
                                             for name in header.extra_datasets))
    lines += [f"  weights {header.weights} sha256 {header.weights_sha256} ({header.weights_source})",
              f"  preprocessing {json.dumps(header.preprocessing)}",
              f"  decode {json.dumps(header.decode)}, precision {header.precision} on {header.device}",
              f"  classes ({len(contents.classes)}): " + ", ".join(f"{c} {counts[c]}" for c in contents.classes)
              if counts is not None else "  unlabelled: no classes, no labels (images without classes)",
              f"  skipped {len(contents.skipped)} of {header.n_listed} listed"
              + "".join(f"\n    {p}: {r}" for p, r in contents.skipped),
              f"  fingerprint {header.fingerprint}, created {header.created}, versions {json.dumps(header.versions)}"]
    return lines
