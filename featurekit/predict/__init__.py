"""Stage 8: classify image files with a head, exactly as its stores were made, and look at the results.

- :mod:`.inputs`: what a path stands for (file, folder, labelled folder);
- :mod:`.classify`: :func:`predict_files`; :mod:`.outputs`: the prediction table and its record;
- :mod:`.neighbors`: the training images nearest to queries or to a head's mistakes.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
