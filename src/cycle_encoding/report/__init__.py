"""The report of an inversion run: one self-contained HTML page and a PNG grid (see ``html.py`` and ``grid.py``)."""
