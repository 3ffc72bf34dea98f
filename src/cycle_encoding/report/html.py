"""The report of an inversion run (``cycle-encoding report``): ``report.html``, ``report.png`` and ``report.json``.
Design notes: docs/INTERNALS.md, "cycle_encoding.report.html"."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..checkpoints.common import atomic_write
from ..checkpoints.run_folder import InversionRun, inside
from ..errors import CycleEncodingError
from ..grid import compose_grid, save_png, strength_label
from ..utils import format_int_list as _ranges
from ..utils import open_image
from .collect import LOWER_IS_BETTER, METRIC_LABELS, collect
from .plots import loss_figure_png

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
nav.toc ol{columns:2;max-width:700px}nav.toc li{margin:2px 0}
.sortable{overflow-x:auto;max-width:100%}.sortable input.sortkey{position:absolute;opacity:0;pointer-events:none}
table.per-image tbody{display:flex;flex-direction:column}table.per-image thead{display:block}
table.per-image tr{display:grid;grid-template-columns:minmax(12em,2fr) repeat(var(--cols),minmax(7em,1fr))}
table.per-image th{white-space:normal}label.sort{cursor:pointer;color:#999;padding:0 2px;user-select:none}
label.sort:hover{color:#000}
.cmp{position:relative;display:inline-block;width:192px;height:192px;background:#eee;vertical-align:top}
.cmp img{width:192px;height:192px;max-width:none;display:block;image-rendering:pixelated;object-fit:contain}
.cmp .cmp-b{position:absolute;top:0;left:0;width:50%;height:100%;overflow:hidden;resize:horizontal;min-width:6px;
max-width:100%;border-right:2px solid #e33}
.cmp-wrap{display:inline-block;margin:0 12px 8px 0;vertical-align:top}.cmp-wrap p{margin:2px 0;max-width:192px}
"""

THUMB = 256  # the largest side of an inlined thumbnail; larger images are reduced and link the full file


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


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


class _Images:
    """Image sources: data URIs (inline) or paths relative to the page."""

    def __init__(self, page: Path, inline: bool, root: Path, thumb: int = THUMB) -> None:
        self.page_dir = page.parent
        self.inline = inline
        self.root = root
        self.thumb = thumb

    def relative(self, path: str | Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.page_dir.resolve())).as_posix()

    def thumbnail(self, path: str | Path | None) -> tuple[str | None, bool]:
        """(the image's source, None for a file outside the run or missing; whether it was reduced): inlined, a data
        URI of the file, or of it reduced to at most ``thumb`` pixels a side; else its path relative to the page."""
        p = None if path is None else Path(path)
        if p is None or not p.is_file() or not inside(p, self.root):  # only the run's own files are ever shown
            return None, False
        if not self.inline:
            return self.relative(p), False
        with open_image(p) as im:
            if max(im.size) <= self.thumb:
                return _data_uri("image/png" if p.suffix.lower() == ".png" else "image/jpeg", p.read_bytes()), False
            small = im.convert("RGB" if im.mode not in ("L", "LA", "1") else "L")
            small.thumbnail((self.thumb, self.thumb), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if small.mode == "RGB":  # photos: JPEG keeps a thumbnail a few tens of kB
            small.save(buf, format="JPEG", quality=85)
            return _data_uri("image/jpeg", buf.getvalue()), True
        small.save(buf, format="PNG", optimize=True)
        return _data_uri("image/png", buf.getvalue()), True

    def tag(self, path: str | Path | None, alt: str) -> str:
        s, reduced = self.thumbnail(path)
        if s is None:
            return f'<span class="small">({esc(alt)}: missing)</span>'
        img = f'<img src="{s}" alt="{esc(alt)}" title="{esc(alt)}">'
        if reduced and path is not None:
            return f'<a href="{esc(self.relative(path))}" title="the full image">{img}</a>'
        return img


def _arrow(metric: str) -> str:
    return "↓" if LOWER_IS_BETTER.get(metric) else "↑" if metric in LOWER_IS_BETTER else ""


def _metrics_table(data: dict[str, Any]) -> str:
    keys = data["metric_keys"]
    head = "".join(f"<th>{esc(METRIC_LABELS.get(k, k))} {_arrow(k)}</th>" for k in keys)
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


def _per_image_columns(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """(header, function of a per-image item -> value) for the per-image table."""
    cols: list[tuple[str, Any]] = [("image", lambda it: it["label"])]
    for s in data["stages"]:
        for k in data["metric_keys"]:
            if any(k in (it.get("metrics") or {}).get(s, {}) for it in data["per_image"]):
                cols.append((f"{s} {METRIC_LABELS.get(k, k)} {_arrow(k)}".strip(),
                             lambda it, s=s, k=k: (it.get("metrics") or {}).get(s, {}).get(k)))  # fmt: skip
    if any(it.get("tune") for it in data["per_image"]):
        cols.append(("tuning steps", lambda it: (it.get("tune") or {}).get("updates")))
    if any("total" in (it.get("timings") or {}) for it in data["per_image"]):
        cols.append(("seconds", lambda it: (it.get("timings") or {}).get("total")))
    return cols


def _ranks(values: list[Any], descending: bool) -> list[int]:
    """Each row's position when sorted by ``values`` (missing values last, ties in name order)."""
    order = sorted((i for i, v in enumerate(values) if v is not None), key=lambda i: values[i], reverse=descending)
    order += [i for i, v in enumerate(values) if v is None]
    return np.argsort(order).tolist()  # the inverse permutation: each row's position


def _per_image_table(data: dict[str, Any]) -> str:
    """Every shown image's metrics per stage, sortable by any column without a script: each header holds two labels
    for hidden radio buttons, each row its position per column and direction (CSS variables), and a CSS rule per
    radio button orders the rows by its variable."""
    cols = _per_image_columns(data)
    items = data["per_image"]
    radios, rules, head = [], [], []
    positions: list[dict[str, int]] = [{} for _ in items]
    for j, (title, get) in enumerate(cols):
        values = [get(it) for it in items]
        for d, desc in (("a", False), ("d", True)):
            rid = f"sort-{j}{d}"
            radios.append(f'<input type="radio" name="per-image-sort" class="sortkey" id="{rid}"'
                          + (" checked" if j == 0 and d == "a" else "") + ">")  # fmt: skip
            rules.append(f"#{rid}:checked~table.per-image tbody tr{{order:var(--{j}{d})}}"
                         f"#{rid}:checked~table.per-image label[for={rid}]{{color:#000;font-weight:bold}}")  # fmt: skip
            for i, r in enumerate(_ranks(values, desc)):
                positions[i][f"--{j}{d}"] = r
        head.append(f'<th>{esc(title)} <label class="sort" for="sort-{j}a" title="sort ascending">▲</label>'
                    f'<label class="sort" for="sort-{j}d" title="sort descending">▼</label></th>')  # fmt: skip
    body = []
    for it, pos in zip(items, positions):
        style = ";".join(f"{k}:{v}" for k, v in pos.items())
        cells = [f'<th><a href="#img-{esc(it["name"])}">{esc(it["label"])}</a></th>']
        for _, get in cols[1:]:
            v = get(it)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num" data-value="{v!r}">{fmt(float(v)) if isinstance(v, float) else v}</td>')
            else:
                cells.append('<td class="num" data-value="">n/a</td>')
        body.append(f'<tr style="{style}" data-image="{esc(it["name"])}">{"".join(cells)}</tr>')
    return (
        f"<style>{''.join(rules)}</style>"
        f'<div class="sortable">{"".join(radios)}'
        f'<table id="per-image" class="per-image" style="--cols:{len(cols) - 1}">'
        f"<thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _compare(item: dict[str, Any], imgs: _Images) -> str:
    """Input against the final reconstruction: the reconstruction on top, cut at a width the reader drags (CSS
    ``resize``), no script."""
    if not item["recons"] or item.get("target") is None:
        return ""
    stage, recon = list(item["recons"].items())[-1]
    a, _ = imgs.thumbnail(item["target"])
    b, _ = imgs.thumbnail(recon)
    if a is None or b is None:
        return ""
    name = item["label"]
    return (
        f'<div class="cmp-wrap"><div class="cmp" title="drag the red edge\'s corner (bottom right) to compare">'
        f'<img src="{a}" alt="{esc(name)}: compare, input">'
        f'<div class="cmp-b"><img src="{b}" alt="{esc(name)}: compare, {esc(stage)}"></div></div>'
        f'<p class="small">left of the red edge: after {esc(stage)}; right: the input. Drag the corner ◢.</p></div>'
    )


def _networks_table(data: dict[str, Any]) -> str:
    named = [(METRIC_LABELS.get(k, k), v) for k, v in data["metric_networks"].items()]
    named += [(f"loss network: {k}", v) for k, v in (data.get("networks") or {}).items()]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in named)
    return f'<table id="networks"><tbody>{rows}</tbody></table>'


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


def _command(doc: dict[str, Any]) -> str:
    """The recorded command, shell-quoted so it can be pasted back (from its ``argv`` where recorded)."""
    argv = doc.get("argv")
    if isinstance(argv, list) and argv:
        return shlex.join(str(a) for a in argv)
    return str(doc.get("command") or "")


def _image_section(item: dict[str, Any], data: dict[str, Any], imgs: _Images) -> str:
    name, label = item["name"], item["label"]
    heads = ["input", *item["recons"]]
    cells = [imgs.tag(item["target"], f"{label}: input")]
    cells += [imgs.tag(p, f"{label}: reconstruction after {s}") for s, p in item["recons"].items()]
    rows = [
        "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in heads) + "</tr>",
        "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>",
    ]
    parts = [f'<section class="image" id="img-{esc(name)}"><h3>{esc(label)}</h3>']
    parts.append(_compare(item, imgs))
    parts.append(f'<table class="images" style="display:inline-table"><tbody>{"".join(rows)}</tbody></table>')
    if m := item.get("metrics"):
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
        cells = [imgs.tag(folder / f, f"{label}: {doc['tag']} {h}") for f, h in zip(rec["files"], heads)]
        gif = ""
        if rec.get("gif") and (folder / rec["gif"]).is_file():
            gif = f' <a href="{esc(imgs.relative(folder / rec["gif"]))}">sweep (GIF)</a>'
        parts.append(
            f'<table class="images edit" data-edit="{esc(doc["tag"])}"><tbody>'
            f'<tr><th colspan="{len(cells)}">edit {esc(doc["tag"])} ({esc(rec.get("generator"))} generator){gif}'
            "</th></tr>"
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
    return compose_grid(rows, col_labels, [it["label"] for it in data["per_image"]])


def _overview(data: dict[str, Any], title: str, plots: bool) -> list[str]:
    """The page's title, what the run holds, what was left out and the table of contents."""
    body = [f"<h1>{esc(title)}</h1>"]
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
    toc = [("summary", "Reconstruction metrics"), ("networks-used", "Networks used")]
    if data["edits"]:
        toc.append(("edits", "Edits and their measures"))
    toc += [("timings-section", "Timings"), ("per-image-section", "Per-image metrics (sortable)"),
            ("images", f"Images ({len(data['per_image'])}): compare, stages, edits")]  # fmt: skip
    if plots:
        toc.append(("losses", "Losses per step"))
    toc.append(("how", "How the run was made"))
    body.append('<nav class="toc"><ol>' + "".join(f'<li><a href="#{i}">{esc(t)}</a></li>' for i, t in toc)
                + "</ol></nav>")  # fmt: skip
    return body


def _edits_section(data: dict[str, Any]) -> list[str]:
    """Each edit: what it moved, on which images it was measured, its measures and the command that made it."""
    if not data["edits"]:
        return []
    body = ['<h2 id="edits">Edits</h2>']
    for doc in data["edits"]:
        body.append(
            f'<h3 data-edit="{esc(doc["tag"])}">{esc(doc["tag"])}</h3><p class="small">{_describe_edit(doc)}</p>'
        )
        if m := doc.get("measured_on"):
            body.append(f'<p class="small">measured on the {len(m["images"])} image(s) of classes '
                        f"{esc(', '.join(m['classes']))} (by {esc(m['classifier'])} on the reconstruction); "
                        f"{len(m['left_out'])} image(s) of other classes left out of the measures</p>")  # fmt: skip
        if doc.get("stale"):
            body.append(f'<p class="small">not shown: the edits of {esc(", ".join(doc["stale"]))}, made before '
                        "the image was inverted again (run the edit again to update them)</p>")  # fmt: skip
        body.append(_edit_measures(doc))
        if doc.get("command"):
            body.append(f'<p class="small">made by <code>{esc(_command(doc))}</code></p>')
    return body


def _loss_plots(data: dict[str, Any], page: Path, inline: bool) -> tuple[list[str], dict[str, str]]:
    """The loss plots per stage (inlined, or written to ``report_files/`` beside the page) and where each went."""
    body = ['<h2 id="losses">Losses per step</h2>']
    files: dict[str, str] = {}
    for stage, curves in data["losses"].items():
        png_bytes = loss_figure_png(stage, curves)
        if inline:
            src = _data_uri("image/png", png_bytes)
        else:
            f = page.parent / "report_files" / f"losses_{stage}.png"
            atomic_write(f, lambda t, b=png_bytes: t.write_bytes(b))
            src = Path(os.path.relpath(f, page.parent)).as_posix()
        files[stage] = src if not inline else "inline"
        body.append(f'<img class="plot" src="{src}" alt="losses of stage {esc(stage)}">')
    return body, files


def report_page(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """The report's HTML file: ``out`` when it ends in .html or .htm, else ``out`` (default the run folder)/report.html."""
    page = Path(out) if out is not None else Path(run_dir) / "report.html"
    return page if page.suffix.lower() in (".html", ".htm") else page / "report.html"


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    inline: bool = True,
    max_images: int | None = None,
    png: bool = True,
    plots: bool = True,
    thumb: int = THUMB,
) -> ReportFiles:
    """Write the report of a run (see the design notes); ``out`` is the HTML file (default ``RUN_DIR/report.html``)."""
    run = InversionRun(run_dir)
    page = report_page(run.dir, out)
    data = collect(run, max_images)
    if not data["per_image"]:
        bad = data["unreadable"]
        raise CycleEncodingError(
            f"{run.dir}: no finished images to report on"
            + (f" ({len(bad)} left out; first: {bad[0]['name']}: {bad[0]['reason']})" if bad else "")
        )
    imgs = _Images(page, inline, run.dir, thumb)
    title = f"Inversion report: {run.dir.name}"
    plots = plots and bool(data["losses"])
    body = _overview(data, title, plots)
    body.append('<h2 id="summary">Reconstruction metrics</h2>')
    body.append(
        '<p class="small">Mean ± sample standard deviation over the images; measured between each stage\'s '
        "reconstruction and the input at the generator's resolution.</p>"
    )
    body += [_metrics_table(data), '<h3 id="networks-used">Networks used</h3>', _networks_table(data)]
    body += _edits_section(data)
    body += ['<h2 id="timings-section">Timings</h2>', _timings_table(data)]
    if d := data.get("generator_delta"):
        body.append(
            f'<p class="small">Tuned generators stored as their change from the base: {fmt(d["mean_bytes_per_image"] / 1e6)}'
            f" MB per image against {fmt(d['full_copy_bytes'] / 1e6)} MB for a full copy ({d['ratio']:.1%}).</p>"
        )
    body.append('<h2 id="per-image-section">Per-image metrics</h2>')
    body.append('<p class="small">Sort by a column with its ▲ / ▼; an image\'s name leads to its pictures.</p>')
    body += [_per_image_table(data), '<h2 id="images">Images</h2>']
    if inline:
        body.append(f'<p class="small">Images larger than {thumb} px are shown reduced; click one for the full '
                    "file (beside the run).</p>")  # fmt: skip
    body += [_image_section(it, data, imgs) for it in data["per_image"]]
    plot_html, plot_files = _loss_plots(data, page, inline) if plots else ([], {})
    body += plot_html
    body.append('<h2 id="how">How the run was made</h2>')
    body.append(f"<pre>{esc(_command(data) or '(command not recorded)')}</pre>")
    body.append("<details><summary>options, generator, encoder</summary><pre>")
    body.append(esc(json.dumps({"options": data["options"], "generator": data["generator"], "encoder": data["encoder"]},
                               indent=2)))  # fmt: skip
    body.append("</pre></details>")
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    atomic_write(page, lambda t: t.write_text(doc, encoding="utf-8"))
    png_path = save_png(build_grid(data), page.with_suffix(".png")) if png else None
    json_path = page.with_suffix(".json")
    data_out = {k: v for k, v in data.items() if k != "losses"}
    data_out["edits"] = [{k: v for k, v in d.items() if k != "_folder"} for d in data["edits"]]
    data_out["loss_plots"] = plot_files
    atomic_write(json_path, lambda t: t.write_text(json.dumps(data_out, indent=2, default=str) + "\n"))
    return ReportFiles(page, png_path, json_path, list(data["unreadable"]))
