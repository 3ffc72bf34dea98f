"""Data: image files and folders (``data.images``); more modules are added beside it."""
