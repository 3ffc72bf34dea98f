"""InterFaceGAN (Shen et al. 2020): an attribute's direction is the unit normal of a linear classifier separating codes
with the attribute from codes without it. Design notes: docs/INTERNALS.md, "cycle_encoding.editing.interfacegan"."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import resize_square
from ..data.images import is_image_file, list_images, read_image
from ..errors import CycleEncodingError
from ..networks.stylegan2 import Generator
from .directions import DirectionSet

CLASSIFIER_METHODS = ("svm", "svc", "logistic")
SPACES = ("w", "w+")
POSITIVE_NAMES = ("1", "pos", "positive", "yes", "true", "with")
_TRUE = {"1", "+1", "true", "yes", "pos", "positive", "y", "t"}
_FALSE = {"0", "-1", "false", "no", "neg", "negative", "n", "f"}


@dataclass
class BoundaryResult:
    """A trained direction and how well its classifier separated the codes."""

    direction: DirectionSet
    method: str
    space: str
    n_positive: int
    n_negative: int
    n_train: int
    n_val: int
    train_accuracy: float
    val_accuracy: float | None
    intercept: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "space": self.space,
            "positives": self.n_positive,
            "negatives": self.n_negative,
            "train": self.n_train,
            "validation": self.n_val,
            "train_accuracy": round(self.train_accuracy, 4),
            "val_accuracy": None if self.val_accuracy is None else round(self.val_accuracy, 4),
            **self.extra,
        }


def _as_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object:
        raise CycleEncodingError(f"{what} must be numbers")
    return a


def _binary(labels: np.ndarray) -> bool:
    vals = np.unique(labels)
    return labels.dtype == bool or set(vals.tolist()) <= {0, 1} or set(vals.tolist()) <= {-1, 1}


def _features(codes: np.ndarray, space: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(features [n, d], the direction's shape)."""
    if codes.ndim == 2:
        if space == "w+":
            raise CycleEncodingError("space 'w+' needs codes [n, N, w_dim]; these are [n, w_dim]")
        return codes, (1, codes.shape[1])
    if codes.ndim != 3:
        raise CycleEncodingError(f"codes must be [n, w_dim] or [n, N, w_dim], got {list(codes.shape)}")
    if space == "w":
        return codes.mean(axis=1), (1, codes.shape[2])
    return codes.reshape(codes.shape[0], -1), (1, codes.shape[1], codes.shape[2])


def make_classifier(method: str, C: float = 1.0, seed: int = 0, max_iter: int = 10_000) -> Any:
    """The scikit-learn classifier named ``method`` (see the design notes)."""
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn takes seconds to import
    from sklearn.svm import SVC, LinearSVC

    if method == "svm":
        return LinearSVC(C=C, max_iter=max_iter, random_state=seed)
    if method == "svc":
        return SVC(kernel="linear", C=C)
    if method == "logistic":
        return LogisticRegression(C=C, max_iter=max_iter)
    raise CycleEncodingError(f"unknown classifier {method!r} (known: {', '.join(CLASSIFIER_METHODS)})")


def train_boundary(
    codes: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[float],
    method: str = "svm",
    space: str = "w",
    C: float = 1.0,
    select_ratio: float | None = None,
    val_fraction: float = 0.3,
    seed: int = 0,
    name: str | None = None,
) -> BoundaryResult:
    """The unit normal of a linear classifier separating ``codes`` by ``labels`` (see the design notes).

    ``select_ratio`` (continuous scores only; default 0.02, InterFaceGAN's): the fraction of codes kept at each end.
    """
    from sklearn.exceptions import ConvergenceWarning  # lazy: scikit-learn

    if space not in SPACES:
        raise CycleEncodingError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    clf = make_classifier(method, C, seed)  # an unknown method fails here, before any work
    X_all = _as_numpy(codes, "codes").astype(np.float64)
    y_raw = _as_numpy(labels, "labels").reshape(-1)
    if X_all.shape[0] != y_raw.shape[0]:
        raise CycleEncodingError(f"{X_all.shape[0]} codes but {y_raw.shape[0]} labels")
    if not np.isfinite(X_all).all() or not np.isfinite(y_raw.astype(np.float64)).all():
        raise CycleEncodingError("codes or labels hold NaN or infinite values")
    X, shape = _features(X_all, space)
    extra: dict[str, Any] = {}
    if _binary(y_raw):
        y = (y_raw.astype(np.float64) > 0).astype(np.int64)
        keep = np.arange(len(y))
    else:
        ratio = 0.02 if select_ratio is None else float(select_ratio)
        if not 0 < ratio <= 0.5:
            raise CycleEncodingError(f"select_ratio must be in (0, 0.5], got {ratio}")
        m = math.floor(len(y_raw) * ratio)
        if m < 2:
            raise CycleEncodingError(
                f"select_ratio {ratio} keeps {m} code(s) per side of {len(y_raw)}: give more codes or a larger ratio"
            )
        order = np.argsort(y_raw, kind="stable")
        keep = np.concatenate([order[-m:], order[:m]])
        y = np.concatenate([np.ones(m, np.int64), np.zeros(m, np.int64)])
        extra.update(select_ratio=ratio, score_threshold_positive=float(y_raw[order[-m]]),
                     score_threshold_negative=float(y_raw[order[m - 1]]))  # fmt: skip
    X = X[keep]
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos < 1 or n_neg < 1:
        raise CycleEncodingError(f"both classes are needed: {n_pos} positive and {n_neg} negative code(s)")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_val = round(len(y) * val_fraction) if val_fraction > 0 else 0
    if n_val and (len(y) - n_val < 2 or len(np.unique(y[perm[n_val:]])) < 2):
        n_val = 0  # too few codes to hold some out
    val, tr = perm[:n_val], perm[n_val:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X[tr], y[tr])
    coef = np.asarray(clf.coef_, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(coef))
    if not norm > 0:
        raise CycleEncodingError("the classifier found no separating direction (all weights are 0)")
    if int(clf.classes_[1]) != 1:  # pragma: no cover - sklearn orders classes, so classes_ = [0, 1]
        coef = -coef
    normal = torch.from_numpy(coef / norm).float().reshape(shape)
    train_acc = float((clf.predict(X[tr]) == y[tr]).mean())
    val_acc = float((clf.predict(X[val]) == y[val]).mean()) if n_val else None
    intercept = float(np.asarray(clf.intercept_).reshape(-1)[0]) / norm
    ds = DirectionSet(
        "interfacegan", normal, names=[name] if name else None,
        meta={"classifier": method, "space": space, "C": C, "train_accuracy": round(train_acc, 4),
              "val_accuracy": None if val_acc is None else round(val_acc, 4), "positives": n_pos,
              "negatives": n_neg, "offset": intercept},
    )  # fmt: skip
    return BoundaryResult(ds, method, space, n_pos, n_neg, len(tr), n_val, train_acc, val_acc, intercept, extra)


# ---------------------------------------------------------------------------------------------------------------
# Labels


def parse_label(value: str) -> float:
    """One label from a CSV cell: 0/1, -1/+1, true/false, yes/no, pos/neg, or a number (a score)."""
    v = value.strip().lower()
    if v in _TRUE:
        return 1.0
    if v in _FALSE:
        return 0.0
    try:
        return float(v)
    except ValueError:
        raise CycleEncodingError(f"label {value!r} is not a number or yes/no") from None


def read_labels_csv(path: str | Path, column: str | int | None = None) -> dict[str, float]:
    """A CSV (or TSV) of ``file,label`` rows -> {file name: label}. A header row is recognized when its label cell is
    not a label; ``column`` picks the label column (by header name or number) when there are several."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise CycleEncodingError(f"{p}: cannot read ({e.strerror})") from None
    delim = "\t" if text.count("\t") > text.count(",") else ","
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delim) if r and any(c.strip() for c in r)]
    if not rows:
        raise CycleEncodingError(f"{p}: no rows")
    header: list[str] | None = None
    col = 1
    try:
        parse_label(rows[0][1] if len(rows[0]) > 1 else "")
    except CycleEncodingError:  # not a label: a header row
        header = [c.strip() for c in rows[0]]
        rows = rows[1:]
        if not rows:
            raise CycleEncodingError(
                f"{p}: no label rows (the only row, {', '.join(header)}, is not file,label)"
            ) from None
    if column is not None:
        if isinstance(column, str) and not column.isdigit():
            if header is None:
                raise CycleEncodingError(f"{p}: no header row, so no column named {column!r}")
            if column not in header:
                raise CycleEncodingError(f"{p}: no column {column!r} (columns: {', '.join(header)})")
            col = header.index(column)
        else:
            col = int(column)
    out: dict[str, float] = {}
    for i, r in enumerate(rows):
        if len(r) <= col:
            raise CycleEncodingError(f"{p}: row {i + 1 + (header is not None)} has no column {col}")
        try:
            out[r[0].strip()] = parse_label(r[col])
        except CycleEncodingError as e:
            raise CycleEncodingError(f"{p}: row {i + 1 + (header is not None)}: {e}") from None
    return out


def labelled_files(
    folder: str | Path, labels: str | Path | Mapping[str, float] | None = None, positive: str | None = None
) -> tuple[list[Path], np.ndarray, dict[str, Any]]:
    """(image files, labels, how the labels were read) for a folder labelled by a CSV / mapping (keys: file names
    relative to the folder, or stems) or by its sub-folders (one per label; which is positive: ``positive``, else
    the one named like 1/pos/positive/yes/true/with; with more than two, ``positive`` against all others)."""
    root = Path(folder)
    if not root.is_dir():
        raise CycleEncodingError(f"{root}: no such folder")
    if labels is not None:
        table = read_labels_csv(labels) if isinstance(labels, (str, Path)) else dict(labels)
        files = list_images(root, recursive=True)
        by_rel = {str(f.relative_to(root)): f for f in files}
        by_name = {f.name: f for f in files}
        by_stem = {f.stem: f for f in files}
        found = {k: by_rel.get(k) or by_name.get(k) or by_stem.get(Path(k).stem if "." in k else k) for k in table}
        missing = [k for k, f in found.items() if f is None]
        if missing:
            raise CycleEncodingError(f"{len(missing)} labelled file(s) not found in {root}, e.g. {missing[0]!r}")
        values = np.asarray([float(v) for v in table.values()])
        return list(found.values()), values, {"labels": str(labels) if isinstance(labels, (str, Path)) else "given"}
    subs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    subs = [d for d in subs if any(is_image_file(f) for f in d.rglob("*"))]
    if len(subs) < 2:
        raise CycleEncodingError(
            f"{root}: give labels (a CSV of file,label) or put the images in sub-folders, one per label "
            f"(found {len(subs)} sub-folder(s) with images)"
        )
    names = [d.name for d in subs]
    if positive is None:
        pos = [n for n in names if n.lower() in POSITIVE_NAMES]
        if len(subs) != 2 or len(pos) != 1:
            raise CycleEncodingError(f"{root}: sub-folders {', '.join(names)}: say which is positive (--positive NAME)")
        positive = pos[0]
    if positive not in names:
        raise CycleEncodingError(f"{root}: no sub-folder {positive!r} (sub-folders: {', '.join(names)})")
    files, values = [], []
    for d in subs:
        fs = list_images(d, recursive=True)
        files += fs
        values += [1.0 if d.name == positive else 0.0] * len(fs)
    return files, np.asarray(values), {"positive": positive, "negative": [n for n in names if n != positive]}


@torch.no_grad()
def encode_labelled_folder(
    encoder: torch.nn.Module,
    folder: str | Path,
    labels: str | Path | Mapping[str, float] | None = None,
    positive: str | None = None,
    batch: int = 16,
) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """(codes ``[n, N, w_dim]``, labels ``[n]``, notes) of a labelled folder's images (see ``labelled_files``), the
    images centre-cropped and resized to the encoder's input."""
    files, values, notes = labelled_files(folder, labels, positive)
    size = int(getattr(encoder, "input_size", 256))
    channels = int(getattr(getattr(encoder, "config", None), "in_channels", 3))
    dev = next(encoder.parameters()).device
    out = []
    for i in range(0, len(files), batch):
        xs = [resize_square(read_image(f, channels), size) for f in files[i : i + batch]]
        out.append(encoder(torch.stack(xs).to(dev)).float().cpu())
    if not out:
        raise CycleEncodingError("no images to encode")
    return torch.cat(out), values, {**notes, "images": len(files)}


@torch.no_grad()
def sample_and_score(
    G: Generator,
    scorer: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    batch: int = 32,
    truncation: float = 1.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[k, w_dim]`` = G.style(z) (truncated toward w_avg), scores ``[k]`` of G's images of them, constant
    noise) for the ``k <= n`` of ``n`` samples the scorer scores: a NaN score leaves a sample out (e.g. class labels of
    a pair attribute, where images of other classes have none). ``progress(b)`` is called after each batch of ``b``."""
    codes, scores = [], []
    for w in G.style_batches(n, seed, batch, truncation):
        b = w.shape[0]
        img = G.synthesis(w[:, None, :].expand(-1, G.num_ws, -1), noise_mode="const")
        s = torch.as_tensor(scorer(img)).reshape(-1).float().cpu()
        if s.numel() != b:
            raise CycleEncodingError(f"the classifier gave {s.numel()} scores for {b} images (one each is needed)")
        codes.append(w.float().cpu())
        scores.append(s)
        if progress is not None:
            progress(b)
    all_codes, all_scores = torch.cat(codes), torch.cat(scores)
    keep = ~torch.isnan(all_scores)
    return all_codes[keep], all_scores[keep]
