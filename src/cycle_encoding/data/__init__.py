"""Data: image files and folders (``data.images``), training sets (``data.datasets``) and named datasets.

The named datasets' modules are imported here: each registers itself in ``datasets.DATASETS``, and Python runs this
file before any module of the package, so ``open_dataset("fashion-mnist:train", ...)`` always finds it.
"""

from . import fashion_mnist  # noqa: F401  (registers "fashion-mnist")
