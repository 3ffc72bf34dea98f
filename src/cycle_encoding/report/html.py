"""The report of an inversion run: one HTML page that needs no network and no script, a PNG grid, and the numbers.

``write_report(run_dir)`` writes, by default into the run folder:
- ``report.html``: per image the input, the reconstruction after each stage and the edits (``cycle-encoding edit``);
  under them the metrics table (mean +- std per stage over the images, with the network behind each metric), the
  editability measures of each edit, the timings, loss plots per stage, the command and options that made the run.
  Images are inlined as ``data:`` URIs (the page is one self-contained file) or, with ``inline=False``, linked by
  relative paths to the run's own files (plots then go to ``report_files/``);
- ``report.png``: a grid with one row per image (input, reconstructions, edits);
- ``report.json``: the numbers the page shows (``collect.collect``), so the table can be checked against them.
Every number in a table cell also sits in ``data-`` attributes at full precision (``data-mean``, ``data-std``,
``data-n``).
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoints.common import atomic_write
from ..editing.render import InversionRun, inside
from ..grid import compose_grid, save_png, strength_label
from .collect import LOWER_IS_BETTER, METRIC_LABELS, collect

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.images td,table.images th{border:none;padding:2px 4px;text-align:center;vertical-align:top}
table.images img{image-rendering:pixelated;width:128px;height:128px;object-fit:contain;background:#eee}
.small{color:#666;font-size:.9em}code,pre{background:#f6f6f6;padding:2px 4px;border-radius:3px}
pre{padding:8px;overflow-x:auto;white-space:pre-wrap}img.plot{max-width:100%;border:1px solid #eee}
"""


@dataclass
class ReportFiles:
    html: Path
    png: Path | None
    json: Path
    unreadable: list[dict[str, str]] = field(default_factory=list)  # images and edits left out: name, reason


def fmt(x: float | None) -> str:
    """A number for a table: 4 significant digits, scientific notation outside [1e-3, 1e4)."""
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.3e}"
    return f"{x:.4g}"


def stat_cell(s: dict[str, Any] | None) -> str:
    """A ``<td>`` for a summarize() result: 'mean ± std' with full-precision data attributes."""
    if not s or s.get("mean") is None:
        return '<td class="num" data-mean="" data-std="" data-n="0">n/a</td>'
    inf = f" (+{s['infinite']} inf)" if s.get("infinite") else ""
    return (
        f'<td class="num" data-mean="{s["mean"]!r}" data-std="{s["std"]!r}" data-n="{s["n"]}">'
        f"{fmt(s['mean'])} ± {fmt(s['std'])}{inf}</td>"
    )


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


class _Images:
    """Image sources: data URIs (inline) or paths relative to the page."""

    def __init__(self, page: Path, inline: bool, root: Path) -> None:
        self.page_dir = page.parent
        self.inline = inline
        self.root = root

    def src(self, path: str | Path | None) -> str | None:
        if path is None:
            return None
        p = Path(path)
        if not p.is_file() or not inside(p, self.root):  # only the run's own files are ever shown
            return None
        if self.inline:
            mime = "image/png" if p.suffix.lower() == ".png" else "image/jpeg"
            return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")
        return Path(os.path.relpath(p.resolve(), self.page_dir.resolve())).as_posix()

    def tag(self, path: str | Path | None, alt: str) -> str:
        s = self.src(path)
        if s is None:
            return f'<span class="small">({esc(alt)}: missing)</span>'
        return f'<img src="{s}" alt="{esc(alt)}" title="{esc(alt)}">'


def _metrics_table(data: dict[str, Any]) -> str:
    keys = data["metric_keys"]
    head = "".join(
        f"<th>{esc(METRIC_LABELS.get(k, k))} {'↓' if LOWER_IS_BETTER.get(k) else '↑' if k in LOWER_IS_BETTER else ''}</th>"
        for k in keys
    )
    rows = []
    for e in data["table"]:
        cells = "".join(stat_cell(e.get(k)) for k in keys)
        rows.append(
            f'<tr data-stage="{esc(e["stage"])}"><th>{esc(e["stage"])}</th><td class="num">{e["images"]}</td>'
            f"{cells}{stat_cell(e.get('seconds'))}</tr>"
        )
    return (
        '<table id="metrics"><thead><tr><th>stage</th><th>images</th>'
        f"{head}<th>seconds / image</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _networks_table(data: dict[str, Any]) -> str:
    rows = [
        f"<tr><th>{esc(METRIC_LABELS.get(k, k))}</th><td>{esc(v)}</td></tr>" for k, v in data["metric_networks"].items()
    ]
    for k, v in (data.get("networks") or {}).items():
        rows.append(f"<tr><th>loss network: {esc(k)}</th><td>{esc(v)}</td></tr>")
    return f'<table id="networks"><tbody>{"".join(rows)}</tbody></table>'


def _timings_table(data: dict[str, Any]) -> str:
    rows = [f'<tr data-timing="{esc(k)}"><th>{esc(k)}</th>{stat_cell(v)}</tr>' for k, v in data["timings"].items()]
    return f'<table id="timings"><thead><tr><th>part</th><th>seconds / image</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _edit_measures(doc: dict[str, Any]) -> str:
    ms = doc.get("measures") or {}
    strengths = doc.get("strengths", [])
    head = "".join(f"<th>{esc(strength_label(a))}</th>" for a in strengths)
    rows = []
    if "lec" in ms:
        cells = "".join(stat_cell(r["lec"]) for r in ms["lec"]["per_strength"])
        rows.append(f'<tr data-measure="lec"><th>LEC ↓ (encoder {esc(ms["lec"].get("encoder"))})</th>{cells}</tr>')
    if "edit_success" in ms:
        es = ms["edit_success"]
        cells = "".join(stat_cell(r["score_change"]) for r in es["per_strength"])
        rows.append(f'<tr data-measure="score_change"><th>score change ({esc(es.get("classifier"))})</th>{cells}</tr>')
        cells = "".join(
            f'<td class="num" data-value="{r["moved_as_asked"]!r}">{r["moved_as_asked"]:.0%}</td>'
            if "moved_as_asked" in r
            else '<td class="num">–</td>'
            for r in es["per_strength"]
        )
        rows.append(f'<tr data-measure="moved_as_asked"><th>moved as asked</th>{cells}</tr>')
    if "preservation" in ms:
        p = ms["preservation"]
        arrow = "↓" if p.get("kind") == "distance" else "↑"
        cells = "".join(stat_cell(r["value"]) for r in p["per_strength"])
        rows.append(
            f'<tr data-measure="preservation"><th>preservation {arrow} ({esc(p.get("measure"))})</th>{cells}</tr>'
        )
    if not rows:
        return '<p class="small">No measures were asked for with this edit.</p>'
    return f'<table class="edit-measures"><thead><tr><th>measure</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _describe_edit(doc: dict[str, Any]) -> str:
    d = doc.get("direction") or {}
    bits = [f"{d.get('method')} direction", f"component {d.get('component')}"]
    if d.get("name"):
        bits.append(f"“{d['name']}”")
    if d.get("source"):
        bits.append(f"from {d['source']}")
    bits.append(f"layers {_ranges(doc.get('layers') or [])}")
    if doc.get("mode") == "set":
        bits.append("mode set (e4e's GANSpace)")
    if d.get("scale", 1.0) != 1.0:
        bits.append(f"strength unit {fmt(d['scale'])} (the component's std)")
    return ", ".join(esc(b) for b in bits)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in [*xs[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if x is not None:
            start = prev = x
    return ",".join(out)


def _image_section(item: dict[str, Any], data: dict[str, Any], imgs: _Images) -> str:
    name = item["name"]
    heads = ["input", *item["recons"]]
    cells = [imgs.tag(item["target"], f"{name}: input")]
    cells += [imgs.tag(p, f"{name}: reconstruction after {s}") for s, p in item["recons"].items()]
    rows = [
        "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in heads) + "</tr>",
        "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>",
    ]
    parts = [f'<section class="image" id="img-{esc(name)}"><h3>{esc(name)}</h3>']
    parts.append(f'<table class="images"><tbody>{"".join(rows)}</tbody></table>')
    m = item.get("metrics") or {}
    if m:
        line = "; ".join(
            f"{esc(s)}: " + ", ".join(f"{esc(METRIC_LABELS.get(k, k))} {fmt(v)}" for k, v in vals.items())
            for s, vals in m.items()
        )
        parts.append(f'<p class="small">{line}</p>')
    for doc in data["edits"]:
        rec = next((r for r in doc.get("images", []) if r.get("name") == name), None)
        if rec is None:
            continue
        folder = Path(doc["_folder"])
        heads = [strength_label(a) for a in doc["strengths"]]
        cells = [imgs.tag(folder / f, f"{name}: {doc['tag']} {h}") for f, h in zip(rec["files"], heads)]
        parts.append(
            f'<table class="images edit" data-edit="{esc(doc["tag"])}"><tbody>'
            f'<tr><th colspan="{len(cells)}">edit {esc(doc["tag"])} ({esc(rec.get("generator"))} generator)</th></tr>'
            "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in heads) + "</tr>"
            "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr></tbody></table>"
        )
    parts.append("</section>")
    return "".join(parts)


def build_grid(data: dict[str, Any]) -> Any:
    """The overview grid (PIL image): a row per image shown: input, reconstructions, every edit."""
    stages = [s for s in data["stages"] if any(s in it["recons"] for it in data["per_image"])]
    col_labels = ["input", *stages]
    for doc in data["edits"]:
        col_labels += [f"{doc['tag']} {strength_label(a)}" for a in doc["strengths"]]
    rows = []
    for it in data["per_image"]:
        row: list[Any] = [it["target"], *[it["recons"].get(s) for s in stages]]
        for doc in data["edits"]:
            rec = next((r for r in doc.get("images", []) if r.get("name") == it["name"]), None)
            folder = Path(doc["_folder"])
            row += [folder / f for f in rec["files"]] if rec else [None] * len(doc["strengths"])
        rows.append(row)
    return compose_grid(rows, col_labels, [it["name"] for it in data["per_image"]])


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    inline: bool = True,
    max_images: int | None = None,
    png: bool = True,
    plots: bool = True,
) -> ReportFiles:
    """Write the report of a run (see the module doc); ``out`` is the HTML file (default ``RUN_DIR/report.html``)."""
    from ..errors import CycleEncodingError

    run = InversionRun(run_dir)
    page = Path(out) if out is not None else run.dir / "report.html"
    if page.suffix.lower() not in (".html", ".htm"):
        page = page / "report.html"
    data = collect(run, max_images)
    if not data["per_image"]:
        bad = data["unreadable"]
        raise CycleEncodingError(
            f"{run.dir}: no finished images to report on"
            + (f" ({len(bad)} left out; first: {bad[0]['name']}: {bad[0]['reason']})" if bad else "")
        )
    imgs = _Images(page, inline, run.dir)
    title = f"Inversion report: {run.dir.name}"
    body: list[str] = [f"<h1>{esc(title)}</h1>"]
    body.append(
        f'<p class="small">{data["images_finished"]} image(s) finished'
        + (f", {data['images_shown']} shown" if data["images_shown"] != data["images_finished"] else "")
        + (f", {len(data['images_failed'])} failed" if data["images_failed"] else "")
        + f"; stages {esc(', '.join(data['stages']))}; run created {esc(data.get('created'))}.</p>"
    )
    if data["unreadable"]:
        body.append('<p class="small">Left out (unreadable or refused):</p><ul class="small">')
        body += [f"<li>{esc(u['name'])}: {esc(u['reason'])}</li>" for u in data["unreadable"]]
        body.append("</ul>")
    body.append("<h2>Images</h2>")
    body += [_image_section(it, data, imgs) for it in data["per_image"]]
    body.append("<h2>Reconstruction metrics</h2>")
    body.append(
        '<p class="small">Mean ± sample standard deviation over the images; measured between each stage\'s '
        "reconstruction and the input at the generator's resolution.</p>"
    )
    body.append(_metrics_table(data))
    body.append("<h3>Networks used</h3>")
    body.append(_networks_table(data))
    if data["edits"]:
        body.append("<h2>Edits</h2>")
        for doc in data["edits"]:
            body.append(
                f'<h3 data-edit="{esc(doc["tag"])}">{esc(doc["tag"])}</h3><p class="small">{_describe_edit(doc)}</p>'
            )
            body.append(_edit_measures(doc))
            if doc.get("command"):
                body.append(f'<p class="small">made by <code>{esc(doc["command"])}</code></p>')
    body.append("<h2>Timings</h2>")
    body.append(_timings_table(data))
    if data.get("generator_delta"):
        d = data["generator_delta"]
        body.append(
            f'<p class="small">Tuned generators stored as their change from the base: {fmt(d["mean_bytes_per_image"] / 1e6)}'
            f" MB per image against {fmt(d['full_copy_bytes'] / 1e6)} MB for a full copy ({d['ratio']:.1%}).</p>"
        )
    plot_files: dict[str, str] = {}
    if plots and data["losses"]:
        from .plots import loss_figure_png

        body.append("<h2>Losses per step</h2>")
        for stage, curves in data["losses"].items():
            png_bytes = loss_figure_png(stage, curves)
            if inline:
                src = "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")
            else:
                f = page.parent / "report_files" / f"losses_{stage}.png"
                atomic_write(f, lambda t, b=png_bytes: t.write_bytes(b))
                src = Path(os.path.relpath(f, page.parent)).as_posix()
            plot_files[stage] = src if not inline else "inline"
            body.append(f'<img class="plot" src="{src}" alt="losses of stage {esc(stage)}">')
    body.append("<h2>How the run was made</h2>")
    body.append(f"<pre>{esc(data['command'] or '(command not recorded)')}</pre>")
    body.append("<details><summary>options, generator, encoder</summary><pre>")
    body.append(esc(json.dumps({"options": data["options"], "generator": data["generator"], "encoder": data["encoder"]},
                               indent=2)))  # fmt: skip
    body.append("</pre></details>")
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    atomic_write(page, lambda t: t.write_text(doc, encoding="utf-8"))
    png_path = None
    if png:
        png_path = page.with_suffix(".png")
        save_png(build_grid(data), png_path)
    json_path = page.with_suffix(".json")
    data_out = {k: v for k, v in data.items() if k != "losses"}
    data_out["edits"] = [{k: v for k, v in d.items() if k != "_folder"} for d in data["edits"]]
    data_out["loss_plots"] = plot_files
    atomic_write(json_path, lambda t: t.write_text(json.dumps(data_out, indent=2, default=str) + "\n"))
    return ReportFiles(page, png_path, json_path, list(data["unreadable"]))
