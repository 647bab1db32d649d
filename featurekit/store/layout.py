"""Where a store keeps the views of each image beside its plain row (no torch: store and verify read it).

A store made with ``extract --augment K`` and/or ``--tta MODE`` holds, beside ``features``
(float16|float32 [N, D], the plain view, exactly as a store without views has it):

- ``features_aug`` [N, K, D]: augmented view ``v`` of row ``i`` at ``[i, v]`` (:mod:`featurekit.views.augment`);
- ``features_tta`` [N, TTA_VIEWS[MODE] - 1, D]: the test-time views after the first, which is the
  plain view and so already ``features[i]``.

Which of them a store has, and their shapes, follow from its identity (``augment_views``, ``tta``):
:func:`extra_datasets`.
"""

from __future__ import annotations

from ..views.augment import TTA_VIEWS

PLAIN = "features"
AUGMENTED = "features_aug"
TEST_TIME = "features_tta"

__all__ = ["AUGMENTED", "PLAIN", "TEST_TIME", "extra_datasets", "view_datasets"]


def extra_datasets(augment_views: int, tta: str) -> dict[str, int]:
    """The view datasets a store of these settings holds: name -> views per row (float[N, views, D])."""
    counts = {AUGMENTED: augment_views, TEST_TIME: TTA_VIEWS[tta] - 1}
    return {name: count for name, count in counts.items() if count}


def view_datasets(augmented, test_time) -> dict:
    """The views of a chunk by dataset (:meth:`~featurekit.views.augment.ViewPlan.split`'s augmented and
    test-time parts, each ``[B, views, D]``), those with views only."""
    return {name: views for name, views in ((AUGMENTED, augmented), (TEST_TIME, test_time)) if views.shape[1]}
