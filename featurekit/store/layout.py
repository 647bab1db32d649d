"""Where a store keeps the views of each image beside its plain row (no torch: store and verify read it).

A store made with ``extract --augment K`` and/or ``--tta MODE`` holds, beside ``features``
(float16|float32 [N, D], the plain view, exactly as a store without views has it):

- ``features_aug`` [N, K, D]: augmented view ``v`` of row ``i`` at ``[i, v]`` (:mod:`featurekit.augment`);
- ``features_tta`` [N, TTA_VIEWS[MODE] - 1, D]: the test-time views after the first, which is the
  plain view and so already ``features[i]``.

Which of them a store has, and their shapes, follow from its identity (``augment_views``, ``tta``):
:func:`extra_datasets`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

PLAIN = "features"
AUGMENTED = "features_aug"
TEST_TIME = "features_tta"

# Test-time mode -> views it makes per image, the plain view first (augment.tta_views makes them).
TTA_VIEWS: Mapping[str, int] = MappingProxyType({"none": 1, "flip": 2, "five-crop": 5})


def extra_datasets(augment_views: int, tta: str) -> dict[str, int]:
    """The view datasets a store of these settings holds: name -> views per row (float[N, views, D])."""
    counts = {AUGMENTED: augment_views, TEST_TIME: TTA_VIEWS[tta] - 1}
    return {name: count for name, count in counts.items() if count}
