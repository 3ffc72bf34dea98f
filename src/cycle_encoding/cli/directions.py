"""``cycle-encoding directions``: write editing directions (InterFaceGAN training, GANSpace, SeFa) and describe
direction files (parsing only; the work is in ``editing/``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.common import sniff, torch_load
from ..checkpoints.encoder import load_encoder
from ..checkpoints.generator import load_generator
from ..checkpoints.native import read_native
from ..checkpoints.run_folder import InversionRun
from ..editing.classifier import as_scorer, parse_pair
from ..editing.directions import ganspace_named_edits, load_directions, parse_layers, save_any
from ..editing.ganspace import ganspace_pca
from ..editing.interfacegan import (
    CLASSIFIER_METHODS,
    SPACES,
    encode_labelled_folder,
    parse_label,
    read_labels_csv,
    sample_and_score,
    train_boundary,
)
from ..editing.sefa import sefa_directions
from ..errors import CycleEncodingError
from ..inversion.pivot import resolve_stage
from ..progress import Progress
from ..sampling import MAX_TRUNCATION, TRUNCATION_WHY
from ..utils import check_finite, resolve_device
from .common import (
    add_classifier_args,
    add_command,
    add_device_arg,
    add_json_arg,
    add_progress_arg,
    check_output_file,
    print_result,
)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "directions",
        parents=[common],
        help="write editing directions: train (InterFaceGAN), ganspace, sefa; show a direction file",
        description="Writes direction files: .pt in the published layouts (InterFaceGAN: a [1, w_dim] or "
        "[1, N, w_dim] tensor; GANSpace: {'mean', 'comp', 'std'}), .npy (an InterFaceGAN boundary), or .safetensors "
        "(the project's format, any method, with layers and values).",
    )
    dsub = p.add_subparsers(dest="directions_command", metavar="ACTION")
    dsub.required = True

    t = add_command(
        dsub, common, "train", cmd_train,
        help="InterFaceGAN: the normal of a linear classifier separating labelled codes",
        description="Trains an InterFaceGAN direction from one source: --codes with --labels (a codes file, or an "
        "inversion RUN_DIR whose pivots are the codes and whose labels are a CSV by image name); --images DIR with "
        "--encoder (labels: --labels CSV of file,label or sub-folders per label); or --generator with --classifier "
        "(samples of the mapping network scored by the classifier; the top and bottom --select-ratio are kept).",
    )  # fmt: skip
    t.add_argument("--out", required=True, type=Path, help="the direction file (.pt, .npy or .safetensors)")
    t.add_argument(
        "--codes", default=None, help="codes [n, w_dim] / [n, N, w_dim] (.npy, .pt, .safetensors) or a RUN_DIR"
    )
    t.add_argument("--labels", default=None,
                   help="labels: .npy/.pt/.txt (one per code, in order) or a CSV of name,label (image folders, runs)")  # fmt: skip
    t.add_argument("--label-column", default=None, help="the CSV's label column (name or number) when it has several")
    t.add_argument("--images", type=Path, default=None, help="a folder of labelled images, encoded by --encoder")
    t.add_argument("--positive", default=None, help="the sub-folder holding the positive images")
    t.add_argument("--encoder", default=None, help="encoder file for --images")
    t.add_argument("--offsets", default="all", choices=("all", "trained"), help="encoder offsets (default all)")
    t.add_argument("--generator", default=None, help="generator file for --classifier sampling")
    add_classifier_args(t, " to score the samples", "the samples of top class A against those of top class B")
    t.add_argument("--samples", type=int, default=10_000, help="generated samples to score (default 10000)")
    t.add_argument("--truncation", type=float, default=1.0, help="truncation of the generated samples (default 1)")
    t.add_argument("--method", default="svm", choices=CLASSIFIER_METHODS,
                   help="svm: LinearSVC (default); svc: SVC(kernel='linear') as InterFaceGAN; logistic")  # fmt: skip
    t.add_argument("--space", default="w", choices=SPACES, help="w: one [w_dim] direction (default); w+: per layer")
    t.add_argument("--C", type=float, default=1.0, help="the classifier's inverse regularization (default 1)")
    t.add_argument("--select-ratio", type=float, default=None,
                   help="with continuous scores: the fraction kept at each end (default 0.02, InterFaceGAN's)")  # fmt: skip
    t.add_argument("--val-fraction", type=float, default=0.3, help="held out to report accuracy (default 0.3)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--name", default=None, help="a name stored with the direction")
    add_device_arg(t)
    add_progress_arg(t)
    add_json_arg(t)

    g = add_command(dsub, common, "ganspace", cmd_from_generator,
                    help="GANSpace: principal components of the mapping outputs")  # fmt: skip
    s = add_command(dsub, common, "sefa", cmd_from_generator,
                    help="SeFa: closed-form directions from the modulation weights")  # fmt: skip
    for q, out, kept in ((g, ".pt (GANSpace's layout) or .safetensors", "components"),
                         (s, ".safetensors (or .pt for a single component)", "directions")):  # fmt: skip
        q.add_argument("--generator", required=True, help="generator file")
        q.add_argument("--out", required=True, type=Path, help=out)
        q.add_argument("--components", type=int, default=None, help=f"{kept} kept (default all w_dim)")
        add_json_arg(q)
    g.add_argument("--samples", type=int, default=100_000, help="mapping samples (default 100000)")
    g.add_argument("--truncation", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    add_device_arg(g)
    s.add_argument("--layers", default=None, metavar="A-B", help="style layers (default: all with a convolution)")
    s.add_argument("--include-torgb", action="store_true", help="also use the ToRGB layers' modulations")
    s.add_argument("--no-normalize", action="store_true", help="do not scale the weight rows to unit norm (rosinality)")

    w = add_command(dsub, common, "show", cmd_show, help="describe a direction file")
    w.add_argument("file", type=Path)
    add_json_arg(w)


# ---------------------------------------------------------------------------------------------------------------


def _read_array(path: Path, what: str) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CycleEncodingError(f"{path}: cannot read {what} ({e})") from None
    if path.suffix.lower() == ".txt":
        return np.asarray([parse_label(s) for s in path.read_text().split() if s.strip()])
    keys = ("codes", "latents", "labels", "scores")
    if sniff(path) == "safetensors":
        t = read_native(path).tensors
        return t[next((k for k in keys if k in t), next(iter(t)))].numpy()
    obj: Any = torch_load(path)
    if isinstance(obj, dict):
        key = next((k for k in keys if k in obj), None)
        if key is None:
            raise CycleEncodingError(f"{path}: a dict without codes/latents/labels/scores")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise CycleEncodingError(f"{path}: {what} must be a tensor, found {type(obj).__name__}")
    return obj.detach().float().cpu().numpy()


def cmd_train(args: argparse.Namespace) -> int:
    sources = [args.codes is not None, args.images is not None, args.classifier is not None]
    if sum(sources) != 1:
        raise CycleEncodingError("give one source: --codes (with --labels), --images (with --encoder) or --classifier")
    check_finite(args.truncation, "--truncation", MAX_TRUNCATION, TRUNCATION_WHY)
    check_output_file(args.out, "--out")
    dev = resolve_device(args.device)
    notes: dict[str, Any] = {}
    if args.codes is not None:
        if args.labels is None:
            raise CycleEncodingError("--codes needs --labels")
        cpath, lpath = Path(args.codes), Path(args.labels)
        if cpath.is_dir():
            run = InversionRun(cpath)
            if lpath.suffix.lower() not in (".csv", ".tsv"):
                raise CycleEncodingError("codes from a run are labelled by a CSV of image name,label")
            table = read_labels_csv(lpath, args.label_column)
            names = [n for n in run.image_names() if n in table]
            if not names:
                raise CycleEncodingError(f"no image of {cpath} is named in {lpath}")
            codes = torch.cat([run.image(n).pivot for n in names]).numpy()
            labels = np.asarray([table[n] for n in names])
            notes = {"codes": f"pivots of {len(names)} image(s) of {cpath}"}
        else:
            codes = _read_array(cpath, "codes")
            if lpath.suffix.lower() in (".csv", ".tsv"):
                labels = np.asarray(list(read_labels_csv(lpath, args.label_column).values()))
            else:
                labels = _read_array(lpath, "labels")
    elif args.images is not None:
        if not args.encoder:
            raise CycleEncodingError("--images needs --encoder")
        E = load_encoder(args.encoder, dev)
        E.stage = resolve_stage(E, args.offsets)
        codes_t, labels, notes = encode_labelled_folder(E, args.images, args.labels, args.positive)
        codes = codes_t.numpy()
    else:
        if not args.generator:
            raise CycleEncodingError("--classifier needs --generator (the samples come from it)")
        G = load_generator(args.generator, dev)
        pair = parse_pair(args.attribute)
        # "A vs B": the samples the classifier puts in class A (label 1) or B (label 0), as InterFaceGAN from labels
        scorer = as_scorer(args.classifier, args.attribute, dev, labels=pair is not None)
        with Progress(args.samples, "score samples", "img", args.progress, heartbeat=30) as bar:
            codes_t, scores = sample_and_score(G, scorer, args.samples, truncation=args.truncation, seed=args.seed,
                                               progress=bar.update)  # fmt: skip
        codes, labels = codes_t.numpy(), scores.numpy()
        notes = {"samples": args.samples, "classifier": str(args.classifier), "attribute": args.attribute}
        if pair is not None:
            notes["labelled_samples"] = f"{len(labels)} of {args.samples} (top class {pair[0]} or {pair[1]})"
    res = train_boundary(codes, labels, args.method, args.space, args.C, args.select_ratio, args.val_fraction,
                         args.seed, args.name)  # fmt: skip
    res.direction.meta.update({k: v for k, v in notes.items() if isinstance(v, (str, int, float)) or v is None})
    save_any(res.direction, args.out)
    print_result({"out": str(args.out), **res.summary()}, args.json)
    return 0


def cmd_from_generator(args: argparse.Namespace) -> int:
    """``ganspace`` and ``sefa``: directions computed from the generator alone."""
    if args.directions_command == "ganspace":
        check_finite(args.truncation, "--truncation", MAX_TRUNCATION, TRUNCATION_WHY)
        check_output_file(args.out, "--out")
        G = load_generator(args.generator, resolve_device(args.device))
        ds = ganspace_pca(G, args.samples, args.components, args.seed, truncation=args.truncation)
    else:
        check_output_file(args.out, "--out")
        G = load_generator(args.generator, "cpu")
        ds = sefa_directions(G, parse_layers(args.layers), args.components, args.include_torgb, not args.no_normalize)
    ds.meta["generator"] = str(args.generator)
    save_any(ds, args.out)
    shown = {k: v for k, v in ds.describe().items() if k != "meta" or args.directions_command == "ganspace"}
    print_result({"out": str(args.out), **shown}, args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ds = load_directions(args.file)
    doc = {"file": str(args.file), **ds.describe()}
    if ds.method == "ganspace" and ds.mean is not None:
        usable = {n: list(e.as_tuple()) for n, e in ganspace_named_edits().items() if e.component < len(ds)}
        if usable:
            doc["named_edits"] = {"(component, first layer, end layer exclusive, strength)": usable}
    print_result(doc, args.json)
    return 0
