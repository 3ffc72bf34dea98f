"""What a report shows, gathered from a run folder into one JSON-able dict (written beside the page as ``report.json``).
Design notes: docs/INTERNALS.md, "cycle_encoding.report.collect"."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoints.run_folder import InversionRun, RunImage, inside
from ..data.images import read_image
from ..errors import CycleEncodingError
from ..metrics import DEFINITIONS, summarize

METRIC_ORDER = ("mse", "psnr", "ssim", "ms_ssim", "perceptual", "identity")
METRIC_LABELS = {"mse": "MSE", "psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}  # others: their key
LOWER_IS_BETTER = {"mse": True, "psnr": False, "ssim": False, "ms_ssim": False, "perceptual": True, "identity": False}


def _metric_keys(records: list[dict[str, Any]], stages: list[str]) -> list[str]:
    seen = {k for r in records for s in stages for k in (r.get("metrics") or {}).get(s, {})}
    return [k for k in METRIC_ORDER if k in seen] + sorted(seen - set(METRIC_ORDER))


def _stage_order(run: InversionRun, records: list[dict[str, Any]]) -> list[str]:
    order = list(run.stages)
    for r in records:
        for s in r.get("stages") or (r.get("metrics") or {}):
            if s not in order:
                order.append(s)
    return order


def metric_networks(run: InversionRun, keys: list[str]) -> dict[str, str]:
    """Which network (or definition) gives each metric."""
    nets, by_network = run.networks, ("perceptual", "identity")
    return {k: nets.get(k, "?") if k in by_network else DEFINITIONS.get(k, "computed by the run") for k in keys}


def loss_curves(images: list[Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{stage: {loss name: {image name: values per step}}} from each image's ``losses.jsonl`` (numeric fields)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for im in images:
        for rec in im.losses():
            stage = str(rec.get("stage", "?"))
            for k, v in rec.items():
                if k in ("stage", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                out.setdefault(stage, {}).setdefault(k, {}).setdefault(im.name, []).append(float(v))
    return out


def _edit_entry(rec: Any, d: Path, tag: str, problems: list[dict[str, str]], shown: set[str]) -> dict | None:
    """An image's record of an ``edit.json`` whose files all lie inside the edit's folder ``d`` (and decode, for an
    image ``shown``); else None, and the refusal named in ``problems``."""
    name = rec.get("name") if isinstance(rec, dict) else None
    files = rec.get("files") if isinstance(rec, dict) else None
    if not isinstance(name, str) or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        problems.append({"name": f"edits/{tag}", "reason": f"{d / 'edit.json'}: an image entry of unknown layout"})
        return None
    try:
        for f in [*files, rec.get("strip")]:
            if isinstance(f, str) and not inside(d / f, d):
                raise CycleEncodingError(f"{d / 'edit.json'}: refused: {f!r} leads outside the edit's folder")
        for f in files if name in shown else []:
            read_image(d / f)  # a cut or corrupt file: one line naming it
    except CycleEncodingError as e:
        problems.append({"name": f"edits/{tag}/{name}", "reason": str(e)})
        return None
    return rec


def read_edits(
    run: InversionRun, problems: list[dict[str, str]] | None = None, images: Sequence[RunImage] = (), shown: int = 0
) -> list[dict[str, Any]]:
    """Each ``edits/TAG/edit.json`` (with its folder), in name order. Unreadable ones, image entries that name
    files outside their folder, and those of the first ``shown`` of ``images`` whose files do not decode are left
    out and named in ``problems``. Entries of an earlier inversion of one of ``images`` (its ``recon_sha256`` is not
    the image's now: the image was inverted again since) are left out and named in the edit's ``stale``."""
    problems = [] if problems is None else problems
    now = {im.name: im.recon_sha256 for im in images}
    decoded = {im.name for im in images[:shown]}
    out = []
    for d in run.edit_folders():
        try:
            doc = json.loads((d / "edit.json").read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("strengths"), list):
                raise ValueError("not an edit.json of cycle-encoding edit")
        except (OSError, ValueError) as e:
            problems.append({"name": f"edits/{d.name}", "reason": f"{d / 'edit.json'}: unreadable ({e})"})
            continue
        doc["tag"] = str(doc.get("tag", d.name))
        recs = [_edit_entry(r, d, doc["tag"], problems, decoded) for r in doc.get("images") or []]
        doc["stale"] = [r["name"] for r in recs if r and None not in (r.get("recon_sha256"), now.get(r["name"]))
                        and r["recon_sha256"] != now[r["name"]]]  # fmt: skip
        doc["images"] = [r for r in recs if r is not None and r["name"] not in doc["stale"]]
        doc["_folder"] = str(d)
        out.append(doc)
    return out


def collect(run: InversionRun | str | Path, max_images: int | None = None) -> dict[str, Any]:
    """The report's content (see the design notes)."""
    run = run if isinstance(run, InversionRun) else InversionRun(run)
    images, problems = run.load_images()
    files: dict[str, tuple[str | None, dict[str, str]]] = {}
    for im in list(images):
        show = max_images is None or len(files) < max_images  # an image shown: its files must decode too
        try:  # every file shown must lie inside the run folder; an image with one that does not is refused
            target = im.checked(im.target_path, image=show)
            candidates = dict.fromkeys([*run.stages, *im.stages, *(im.result.get("metrics") or {})])
            recons = {s: str(p) for s in candidates if (p := im.checked(im.recon_path(s), image=show)) is not None}
        except CycleEncodingError as e:
            problems.append({"name": im.name, "reason": str(e)})
            images.remove(im)
            continue
        files[im.name] = (str(target) if target is not None else None, recons)
    shown = images if max_images is None else images[:max_images]
    records = [im.result for im in images]
    stages = _stage_order(run, records)
    keys = _metric_keys(records, stages)
    table = []
    for s in stages:
        rows = [r for r in records if s in (r.get("metrics") or {})]
        if not rows:
            continue
        metrics = {k: summarize([r["metrics"][s].get(k) for r in rows]) for k in keys}
        seconds = summarize([(r.get("timings") or {}).get(s) for r in rows])
        table.append({"stage": s, "images": len(rows), **metrics, "seconds": seconds})
    timing_keys = dict.fromkeys(k for r in records for k in r.get("timings") or {})  # in first-seen order
    timings = {k: summarize([(r.get("timings") or {}).get(k) for r in records]) for k in timing_keys}
    edits = read_edits(run, problems, images, len(shown))
    per_image = []
    for im in shown:
        target, recons = files[im.name]
        per_image.append({
            "name": im.name,
            "label": im.label,
            "target": target,
            "recons": {s: recons[s] for s in stages if s in recons},
            "metrics": im.result.get("metrics", {}),
            "timings": im.result.get("timings", {}),
            "tune": im.result.get("tune"),
            "delta": im.result.get("delta"),
        })  # fmt: skip
    cfg = run.config
    return {
        "run_dir": str(run.dir),
        "created": cfg.get("created"),
        "command": run.command,
        "argv": cfg.get("argv"),
        "options": cfg.get("options", {}),
        "generator": {k: (cfg.get("generator") or {}).get(k) for k in ("file", "weights_sha256", "config")},
        "encoder": {k: (cfg.get("encoder") or {}).get(k) for k in ("file", "weights_sha256", "trained_stage")}
        if cfg.get("encoder")
        else None,
        "networks": run.networks,
        "metric_networks": metric_networks(run, keys),
        "stages": stages,
        "metric_keys": keys,
        "images_finished": len(images),
        "images_shown": len(shown),
        "images_failed": (run.summary or {}).get("failed", []),
        "unreadable": problems,
        "table": table,
        "timings": timings,
        "generator_delta": (run.summary or {}).get("generator_delta"),
        "per_image": per_image,
        "edits": edits,
        "losses": loss_curves(shown),
    }
