"""featurekit: cached-feature extraction for image transfer learning.

images -> decode once -> per-backbone views -> frozen trunks -> HDF5 stores -> feature dataset -> head
"""

__version__ = "0.1.0"
