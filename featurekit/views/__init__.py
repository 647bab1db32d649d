"""Stage 2: per-backbone views of each decoded image, fed to the trunks in chunk-aligned batches.

- :mod:`.preprocessing`: a backbone's :class:`Preprocessing`, read off its weights: the uint8 view
  cut in loader workers, the normalisation run on the device;
- :mod:`.augment`: seeded augmented and test-time views cut from the same decode (:class:`ViewPlan`);
- :mod:`.loader`: the DataLoader of views; :mod:`.gpu_decode`: batched nvJPEG decoding on CUDA.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
