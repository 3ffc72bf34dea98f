"""Reconstruction metrics per image on images in [-1, 1] (MSE, PSNR, SSIM, MS-SSIM, a named perceptual distance, a
named identity similarity), ``evaluate_folders``, and the classifier FD.
Design notes: docs/INTERNALS.md, "cycle_encoding.metrics"."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_msssim
import torch

from .data.images import is_image_file, read_image
from .errors import CycleEncodingError
from .ops import convert_channels, resize

if TYPE_CHECKING:
    from .losses.identity import IdentitySimilarity
    from .losses.perceptual import PerceptualDistance

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIDE = (SSIM_WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1  # 161

DEFINITIONS = {
    "mse": "mean squared error on the [-1, 1] scale (divide by 4 for [0, 1] units)",
    "psnr": "10 log10(4 / MSE) dB on [-1, 1] (peak-to-peak 2)",
    "ssim": "SSIM, 11-px Gaussian window sigma 1.5, K 0.01/0.03, on [0, 1] (pytorch_msssim.ssim)",
    "ms_ssim": "MS-SSIM, 5 scales, standard weights, 11-px window (pytorch_msssim.ms_ssim); n/a below 161 px",
}


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 4 or pred.shape != target.shape:
        raise CycleEncodingError(
            f"metrics compare two [B, C, H, W] batches of one shape, got {list(pred.shape)} and {list(target.shape)}"
        )


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error over channels and pixels (images in [-1, 1])."""
    _check_pair(pred, target)
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """[B] peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); +inf where the images are equal."""
    return 10 * torch.log10(data_range**2 / mse(pred, target))


def ssim_unavailable_reason(height: int, width: int) -> str | None:
    """Why SSIM cannot be computed for this size, or None."""
    if min(height, width) < SSIM_WINDOW:
        return f"SSIM needs both sides >= {SSIM_WINDOW} px (its window), got {height}x{width}"
    return None


def ms_ssim_unavailable_reason(height: int, width: int) -> str | None:
    """Why the standard 5-scale MS-SSIM cannot be computed for this size, or None."""
    if min(height, width) < MS_SSIM_MIN_SIDE:
        return (
            f"MS-SSIM with {len(MS_SSIM_WEIGHTS)} scales and an {SSIM_WINDOW}-px window needs both sides > "
            f"{MS_SSIM_MIN_SIDE - 1} px, got {height}x{width} (see SSIM instead)"
        )
    return None


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def _pytorch_msssim(
    name: str, unavailable: Callable[[int, int], str | None], pred: torch.Tensor, target: torch.Tensor, **kw: Any
) -> torch.Tensor:
    _check_pair(pred, target)
    reason = unavailable(*pred.shape[-2:])
    if reason:
        raise CycleEncodingError(reason)
    return getattr(pytorch_msssim, name)(_unit(pred), _unit(target), data_range=1.0, size_average=False,
                                         win_size=SSIM_WINDOW, win_sigma=SSIM_SIGMA, K=SSIM_K, **kw)  # fmt: skip


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] SSIM of images in [-1, 1] (mapped to [0, 1], data range 1); see the design notes."""
    return _pytorch_msssim("ssim", ssim_unavailable_reason, pred, target)


def ms_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] standard 5-scale MS-SSIM of images in [-1, 1]; a CycleEncodingError for images of 160 px or less."""
    return _pytorch_msssim("ms_ssim", ms_ssim_unavailable_reason, pred, target, weights=list(MS_SSIM_WEIGHTS))


def summarize(values: list[float | None]) -> dict[str, Any]:
    """{'mean', 'std', 'n'} over the finite values; std is the sample standard deviation (n - 1), 0 for a single
    value; mean and std are None when no value exists. Values that are None (n/a) are left out; infinite values
    (the PSNR of identical images) are left out too and counted in 'infinite'."""
    finite = [x for x in values if x is not None and math.isfinite(x)]
    n_inf = sum(1 for x in values if x is not None and not math.isfinite(x))
    v = np.array(finite, dtype=np.float64)
    out: dict[str, Any] = {"mean": None, "std": None, "n": int(v.size)}
    if v.size:
        out["mean"] = float(v.mean())
        out["std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    if n_inf:
        out["infinite"] = n_inf
    return out


# ---------------------------------------------------------------------------------------------------------------
# Batches of pairs


def compute_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    perceptual: PerceptualDistance | None = None,
    identity: IdentitySimilarity | None = None,
) -> tuple[dict[str, list[float | None]], list[str]]:
    """All metrics of a batch of pairs: ({metric: [value or None per image]}, notes on values left out)."""
    out: dict[str, list[float | None]] = {}
    notes: list[str] = []
    with torch.no_grad():
        out["mse"] = mse(pred, target).tolist()
        out["psnr"] = psnr(pred, target).tolist()
        measures = {"ssim": ssim, "ms_ssim": ms_ssim, "perceptual": perceptual, "identity": identity}
        for key, measure in measures.items():
            if measure is None:
                continue
            try:  # a size SSIM / MS-SSIM cannot measure, or a network's refusal: n/a with the reason
                out[key] = measure(pred, target).float().cpu().tolist()
            except CycleEncodingError as e:
                out[key] = [None] * pred.shape[0]
                notes.append(f"{key}: n/a: {e}")
    return out, notes


# ---------------------------------------------------------------------------------------------------------------
# Folders


@dataclass
class FolderPairing:
    """How two folders' image files pair up by name (the file name without its extension)."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)
    pred_only: list[str] = field(default_factory=list)
    target_only: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _by_stem(folder: Path, side: str, pairing: FolderPairing) -> dict[str, Path]:
    if not folder.is_dir():
        raise CycleEncodingError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    groups: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if not is_image_file(p):
            pairing.ignored.append(f"{side}/{p.name} (not an image file name)")
            continue
        groups.setdefault(p.stem, []).append(p)
    out = {}
    for stem, files in groups.items():
        if len(files) > 1:
            pairing.ambiguous.append(f"{side}: {', '.join(f.name for f in files)} (one name, several files)")
        else:
            out[stem] = files[0]
    return out


def pair_folders(pred_dir: str | Path, target_dir: str | Path) -> FolderPairing:
    """Pair the image files of two folders by file name without extension (``a.png`` with ``a.jpg``)."""
    pairing = FolderPairing()
    pred = _by_stem(Path(pred_dir), "pred", pairing)
    target = _by_stem(Path(target_dir), "target", pairing)
    pairing.pairs = [(s, pred[s], target[s]) for s in sorted(pred) if s in target]
    pairing.pred_only = [pred[s].name for s in sorted(pred) if s not in target]
    pairing.target_only = [target[s].name for s in sorted(target) if s not in pred]
    return pairing


def pair_files(pred: Mapping[str, Path], target: Mapping[str, Path] | str | Path) -> FolderPairing:
    """Pair named prediction files (e.g. an inversion run's reconstructions, by image name) with named target files
    or with a folder's image files by file name without extension."""
    pairing = FolderPairing()
    tgt = dict(target) if isinstance(target, Mapping) else _by_stem(Path(target), "target", pairing)
    pairing.pairs = [(s, pred[s], tgt[s]) for s in sorted(pred) if s in tgt]
    pairing.pred_only = [s for s in sorted(pred) if s not in tgt]
    pairing.target_only = [tgt[s].name for s in sorted(tgt) if s not in pred]
    return pairing


def _prepare(
    pred: torch.Tensor, target: torch.Tensor, size: int | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    notes = []
    if pred.shape[0] != target.shape[0]:
        notes.append(
            f"channels differ: pred has {pred.shape[0]}, target {target.shape[0]}; the grey one was repeated to 3"
        )
        pred, target = convert_channels(pred, 3), convert_channels(target, 3)
    if size is not None:
        pred, target = resize(pred[None], size)[0], resize(target[None], size)[0]
    if pred.shape[-2:] != target.shape[-2:]:
        raise CycleEncodingError(
            f"sizes differ: pred {pred.shape[-2]}x{pred.shape[-1]}, target {target.shape[-2]}x{target.shape[-1]} "
            "(pass a size to resize both)"
        )
    return pred, target, notes


Pair = tuple[dict[str, Any], torch.Tensor, torch.Tensor]  # (the pair's record, pred [C, H, W], target [C, H, W])


def _read_pairs(
    pairing: FolderPairing, size: int | None, report: dict[str, Any], progress: Callable[[int], None] | None
) -> Iterator[Pair]:
    """The pairs that can be compared, read and prepared; the others go to ``report``'s ``unreadable`` and
    ``skipped`` (each counted as done by ``progress``)."""
    for name, pp, tp in pairing.pairs:
        images = []
        for side, path in (("pred", pp), ("target", tp)):
            try:
                images.append(read_image(path, min_side=None))  # measured at full size
            except CycleEncodingError as e:
                report["unreadable"].append({"file": f"{side}/{path.name}", "reason": str(e)})
        try:
            if len(images) < 2:
                raise CycleEncodingError("unreadable file")
            p, t, pair_notes = _prepare(images[0], images[1], size)
        except CycleEncodingError as e:
            report["skipped"].append({"name": name, "reason": str(e)})
            if progress:
                progress(1)
            continue
        yield ({"name": name, "pred": pp.name, "target": tp.name, "size": [int(p.shape[-2]), int(p.shape[-1])],
                "channels": int(p.shape[0]), "notes": pair_notes}, p, t)  # fmt: skip


def _batches(pairs: Iterator[Pair], batch_size: int) -> Iterator[list[Pair]]:
    """Runs of at most ``batch_size`` pairs of one shape."""
    batch: list[Pair] = []
    for item in pairs:
        if batch and (len(batch) >= batch_size or batch[0][1].shape != item[1].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _summary(records: list[dict[str, Any]], metrics: list[str], notes: dict[str, int]) -> dict[str, Any]:
    """:func:`summarize` per metric, with a note on the values left out and why."""
    summary = {m: summarize([r[m] for r in records]) for m in metrics}
    for m in metrics:
        missing = sum(1 for r in records if r[m] is None)
        said = []
        if missing:
            reasons = sorted({n.split(": n/a: ", 1)[1] for n in notes if n.startswith(f"{m}: n/a: ")})
            said.append(f"n/a for {missing} image(s): " + "; ".join(reasons))
        if summary[m].get("infinite"):
            said.append(f"{summary[m]['infinite']} infinite value(s) (identical images) left out of mean and std")
        if said:
            summary[m]["note"] = "; ".join(said)
    return summary


def evaluate_folders(
    pred_dir: str | Path,
    target_dir: str | Path,
    perceptual: PerceptualDistance | None = None,
    identity: IdentitySimilarity | None = None,
    size: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
    pairing: FolderPairing | None = None,
) -> dict[str, Any]:
    """Pair ``pred_dir`` and ``target_dir`` by file name and measure every pair (``pairing``: pairs made by the
    caller, e.g. ``pair_files`` over a run's reconstructions; the two names then only label the report).

    Returns a JSON-ready dict: ``images`` (one record per pair: name, files, size, each metric, notes), ``summary``
    (mean, sample std and count per metric), ``networks`` (the perceptual and identity networks' names),
    ``definitions``, and what was left out: ``pred_only``/``target_only`` (unmatched), ``unreadable`` (file and
    reason), ``skipped`` (pairs that cannot be compared, e.g. sizes differ), ``ambiguous``, ``ignored``.
    Unreadable or unmatched files never stop the run. ``size`` resizes both images to size x size (antialiased
    bilinear) before measuring. ``progress(n)`` is called after each batch with the number of pairs done in it.
    """
    dev = torch.device(device)
    if pairing is None:
        pairing = pair_folders(pred_dir, target_dir)
    nets = {"perceptual": perceptual, "identity": identity}
    metrics = ["mse", "psnr", "ssim", "ms_ssim"] + [k for k, net in nets.items() if net is not None]
    report: dict[str, Any] = {"unreadable": [], "skipped": []}
    records: list[dict[str, Any]] = []
    notes: dict[str, int] = {}
    for batch in _batches(_read_pairs(pairing, size, report, progress), batch_size):
        pred = torch.stack([b[1] for b in batch]).to(dev)
        target = torch.stack([b[2] for b in batch]).to(dev)
        values, batch_notes = compute_metrics(pred, target, perceptual, identity)
        for n in batch_notes:
            notes[n] = notes.get(n, 0) + len(batch)
        for i, (rec, _, _) in enumerate(batch):
            records.append({**rec, **{m: values[m][i] for m in metrics}})
        if progress:
            progress(len(batch))
    definitions = dict(DEFINITIONS)
    if perceptual is not None:
        definitions["perceptual"] = f"{perceptual.name}: per-image distance (lower is closer)"
    if identity is not None:
        definitions["identity"] = f"{identity.name}: cosine similarity of embeddings (1 = same)"
    return {
        "pred_dir": str(pred_dir), "target_dir": str(target_dir), "size": size,
        "networks": {k: net.name if net is not None else None for k, net in nets.items()},
        "metrics": metrics, "definitions": definitions, "summary": _summary(records, metrics, notes),
        "images": records, "pairs": len(records), "pred_only": pairing.pred_only, "target_only": pairing.target_only,
        "unreadable": report["unreadable"], "skipped": report["skipped"], "ambiguous": pairing.ambiguous,
        "ignored": pairing.ignored, "notes": [f"{n} ({k} image(s))" for n, k in notes.items()],
    }  # fmt: skip


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` with non-finite floats (an infinite PSNR of identical images) written as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance of classifier features (the "classifier FD"; NOT the Inception FID)


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``, the matrix square root by
    ``scipy.linalg.sqrtm`` (in float64; its tiny imaginary part from rounding is dropped, as the FID code does)."""
    from scipy import linalg  # lazy: 0.8 s to import, for the Frechet distance only

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise CycleEncodingError(
            f"Frechet distance of Gaussians of different sizes: means {mu1.shape}, {mu2.shape}, "
            f"covariances {s1.shape}, {s2.shape}"
        )
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularize both covariances a little
        eps = 1e-6 * np.eye(s1.shape[0])
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def feature_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of ``feats`` [N, D] (N >= 2), in float64."""
    f = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise CycleEncodingError(f"feature statistics need [N, D] features with N >= 2, got shape {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets [N, D] and [M, D]."""
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


@torch.no_grad()
def classifier_features(classifier: Any, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """[N, D] penultimate embeddings (``classifier.embed``, e.g. an ``AttributeClassifier`` of arch convnet/vggbn)
    of images [N, C, H, W] in [-1, 1], computed in batches, in eval mode."""
    if not hasattr(classifier, "embed"):
        raise CycleEncodingError(f"{type(classifier).__name__} has no embed(x) method (penultimate features)")
    classifier.eval()
    dev = next((p.device for p in classifier.parameters()), torch.device("cpu"))
    return torch.cat([classifier.embed(x.to(dev)).float().cpu() for x in images.split(batch_size)])


def classifier_frechet_distance(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    classifier: Any,
    batch_size: int = 500,
    name: str | None = None,
) -> dict[str, Any]:
    """The "classifier FD" of two image sets: :func:`frechet_distance` of the classifier's penultimate features
    (for Fashion-MNIST the shipped ``fmnist-eval`` network, which no training loss uses). Returns
    ``{"name", "fd", "images_a", "images_b", "dims"}``; ``name`` says plainly that this is not the Inception FID.
    Values are comparable only between runs using the same classifier file and similar image counts. ``name``: the
    classifier's name in that label (default: the stem of the file it was loaded from, else its ``name``)."""
    fa = classifier_features(classifier, images_a, batch_size)
    fb = classifier_features(classifier, images_b, batch_size)
    label = name or str(getattr(classifier, "name", type(classifier).__name__))
    if name is None and " from " in label and label.endswith(".safetensors"):
        label = Path(label.rsplit(" from ", 1)[1]).stem
    return {
        "name": f"FD ({label} classifier features; not the Inception FID)",
        "fd": frechet_distance(fa, fb),
        "images_a": len(fa),
        "images_b": len(fb),
        "dims": int(fa.shape[1]),
    }


@torch.no_grad()
def generator_sample_metrics(
    G: Any,
    classifier: Any,
    reference: torch.Tensor,
    samples: int = 10_000,
    seed: int = 0,
    batch_size: int = 500,
) -> dict[str, Any]:
    """How well a generator covers its domain, by a classifier: the classifier FD between ``samples`` images of G
    (``z ~ N(0, I)`` from a CPU generator seeded with ``seed``, drawn ``batch_size`` at a time; constant noise; no
    truncation) and the ``reference`` images [N, C, H, W] in [-1, 1], and how many samples the classifier puts in
    each of its classes. Returns :func:`classifier_frechet_distance`'s fields plus ``class_counts`` (output name ->
    count) and ``min_class_share`` (the rarest class's share of the samples)."""
    if samples < 2:
        raise CycleEncodingError(f"the generator metrics need at least 2 samples, got {samples}")
    g = torch.Generator().manual_seed(seed)
    dev = next((p.device for p in G.parameters()), torch.device("cpu"))
    was_training = G.training
    G.eval()
    try:
        fakes = []
        for i in range(0, samples, batch_size):
            z = torch.randn(min(batch_size, samples - i), G.z_dim, generator=g)
            fakes.append(G(z.to(dev), noise_mode="const").clamp(-1, 1).float().cpu())
    finally:
        G.train(was_training)
    fake = torch.cat(fakes)
    out = classifier_frechet_distance(fake, reference, classifier, batch_size)
    cdev = next((p.device for p in classifier.parameters()), torch.device("cpu"))
    labels = torch.cat([classifier(x.to(cdev)).argmax(1).cpu() for x in fake.split(batch_size)])
    names = list(getattr(classifier, "outputs", None) or [])
    k = max(len(names), int(labels.max()) + 1)
    counts = torch.bincount(labels, minlength=k).tolist()
    names += [str(i) for i in range(len(names), k)]
    out["class_counts"] = dict(zip(names, counts, strict=True))
    out["min_class_share"] = min(counts) / samples
    out["samples"] = samples
    return out
