"""Data: image files and folders (``data.images``), training sets (``data.datasets``) and named datasets, whose
modules register themselves in ``datasets.DATASETS`` when imported here."""

from . import fashion_mnist  # noqa: F401  (registers "fashion-mnist")
