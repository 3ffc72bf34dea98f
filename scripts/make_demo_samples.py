"""Recreate the demo's sample images, examples/fashion-mnist/, from the Fashion-MNIST test split (t10k).

The choice is deterministic: the first ``--per-class`` (2) test images of each class in CLASS_ORDER, in the order of
the split. Each is written exactly as the project's reader gives it (``FashionMNIST("test", size=32)``: the 28x28
image padded to 32x32 with background), as an 8-bit grey PNG that reads back (``read_image``) to the same tensor.
Names: ``test-IIIII-CLASS.png`` (index in the test split, class slug). Also writes labels.csv (name,label,class).

    python scripts/make_demo_samples.py                 # from the Debian package dataset-fashion-mnist
    python scripts/make_demo_samples.py --root DIR      # idx files in DIR
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from cycle_encoding.data.fashion_mnist import CLASSES, FashionMNIST
from cycle_encoding.utils import save_image

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "examples" / "fashion-mnist"
# The classes the demo's edits act on (pullover <-> coat, sneaker <-> ankle boot), then two others.
CLASS_ORDER = ("Pullover", "Coat", "Sneaker", "Ankle boot", "T-shirt/top", "Trouser")


def slug(name: str) -> str:
    """A class name as a file-name part: 'T-shirt/top' -> 't-shirt-top', 'Ankle boot' -> 'ankle-boot'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sample_name(index: int, label: int) -> str:
    return f"test-{index:05d}-{slug(CLASSES[label])}.png"


def choose(labels: list[int], per_class: int = 2, class_order: tuple[str, ...] = CLASS_ORDER) -> list[int]:
    """Indices of the first ``per_class`` images of each class in ``class_order``, grouped in that order."""
    chosen: list[int] = []
    for name in class_order:
        label = CLASSES.index(name)
        found = [i for i, y in enumerate(labels) if y == label][:per_class]
        if len(found) < per_class:
            raise SystemExit(f"error: only {len(found)} test images of class {name!r}")
        chosen += found
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--root", type=Path, default=None, help="folder of the idx files (default: the Debian package's)")
    ap.add_argument("--per-class", type=int, default=2)
    args = ap.parse_args(argv)

    ds = FashionMNIST("test", size=32, channels=1, root=args.root)
    indices = choose(ds.labels.tolist(), args.per_class)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in indices:
        label = int(ds.labels[i])
        name = sample_name(i, label)
        save_image(ds.load(i), args.out / name)
        rows.append((name, label, CLASSES[label]))
        print(f"{args.out / name}  ({CLASSES[label]})")
    with open(args.out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("name", "label", "class"))
        w.writerows(rows)
    print(f"{len(rows)} images and labels.csv in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
