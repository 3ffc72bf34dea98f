"""``cycle-encoding report``: the metrics table matches the run's JSON files, the page needs no network, every image
loads in a headless browser (Debian's chromium), and the PNG grid has a row per image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycle_encoding.cli import main
from cycle_encoding.editing import interfacegan_direction, save_interfacegan
from cycle_encoding.report.html import fmt
from tests.test_editing_render import make_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A tuned run with two edits (one with measures), and its report (images inlined)."""
    info = make_run(tmp_path_factory.mktemp("report"), stages=("encoder", "project", "tune"), n_images=3)
    run = info["run"]
    save_interfacegan(interfacegan_direction(torch.randn(32, generator=torch.Generator().manual_seed(2))),
                      info["root"] / "smile.pt")  # fmt: skip
    assert main(["edit", str(run), "--direction", str(info["root"] / "smile.pt"), "--strengths", "-2,0,2",
                 "--lec", "--preservation", "mse", "--quiet"]) == 0  # fmt: skip
    assert main(["edit", str(run), "--direction", "sefa", "--component", "1", "--strengths", "-1,0,1", "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    return info


class Cells(HTMLParser):
    """Collects, per table id, rows of (tag, attributes, text) cells, and every <img> and link."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, dict, str]]]] = {}
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.scripts = 0
        self._table: list[str | None] = []
        self._row: list[tuple[str, dict, str]] | None = None
        self._cell: tuple[str, dict] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table.append(a.get("id"))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell, self._text = (tag, a), []
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "script":
            self.scripts += 1
        for k in ("href", "src"):
            if k in a and tag != "img":
                self.links.append(a[k])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append((self._cell[0], self._cell[1], "".join(self._text).strip()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            tid = self._table[-1] if self._table else None
            if tid:
                self.tables.setdefault(tid, []).append(self._row)
            self._row = None
        elif tag == "table" and self._table:
            self._table.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._text.append(data)


def parse(path: Path) -> Cells:
    p = Cells()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_the_metrics_table_matches_the_runs_json(reported):
    run = reported["run"]
    page = parse(run / "report.html")
    rows = page.tables["metrics"]
    header = [c[2] for c in rows[0]]
    assert header[:2] == ["stage", "images"] and header[-1] == "seconds / image"
    results = [json.loads(p.read_text()) for p in sorted((run / "images").glob("*/result.json"))]
    assert len(results) == 3
    stages = [r[0][2] for r in rows[1:]]
    assert stages == ["encoder", "project", "tune"]
    labels = {"MSE": "mse", "PSNR (dB)": "psnr", "perceptual": "perceptual"}
    checked = 0
    for row in rows[1:]:
        stage = row[0][2]
        assert int(row[1][2]) == 3
        for h, cell in zip(header[2:], row[2:]):
            key = next((v for k, v in labels.items() if h.startswith(k)), None)
            if key is None:
                vals = np.array([r["timings"][stage] for r in results])
            else:
                vals = np.array([r["metrics"][stage][key] for r in results])
            mean, std = float(vals.mean()), float(vals.std(ddof=1))
            attrs = cell[1]
            assert float(attrs["data-mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15)
            assert float(attrs["data-std"]) == pytest.approx(std, rel=1e-12, abs=1e-15)
            assert int(attrs["data-n"]) == 3
            assert cell[2] == f"{fmt(mean)} ± {fmt(std)}"  # what a reader sees
            checked += 1
    assert checked == 3 * 4  # mse, psnr, perceptual, seconds for each stage
    # report.json holds the same numbers
    data = json.loads((run / "report.json").read_text())
    tune = next(e for e in data["table"] if e["stage"] == "tune")
    mse = np.array([r["metrics"]["tune"]["mse"] for r in results])
    assert tune["mse"]["mean"] == pytest.approx(float(mse.mean()), rel=1e-12)
    # the networks behind the metrics, timings and the command are on the page
    nets = {r[0][2]: r[1][2] for r in page.tables["networks"]}
    assert nets["perceptual"] == "stand-in perceptual"
    assert "tune" in {r[0][2] for r in page.tables["timings"]}
    text = (run / "report.html").read_text()
    assert '<h2 id="how">How the run was made</h2>' in text and "Losses per step" in text


def test_edit_sections_and_measures(reported):
    run = reported["run"]
    text = (run / "report.html").read_text()
    assert 'data-edit="smile"' in text and 'data-edit="sefa_c1"' in text
    doc = json.loads((run / "edits" / "smile" / "edit.json").read_text())
    lec = re.search(r'<tr data-measure="lec">(.*?)</tr>', text).group(1)
    means = [float(m) for m in re.findall(r'data-mean="([^"]+)"', lec)]
    assert means == [r["lec"]["mean"] for r in doc["measures"]["lec"]["per_strength"]]
    # images per image section: the before/after compare (2), input + 3 reconstructions + 3 + 3 edits
    page = parse(run / "report.html")
    per_image = [i for i in page.imgs if "im0:" in i.get("alt", "")]
    assert len(per_image) == 2 + 1 + 3 + 3 + 3


def test_the_page_is_self_contained(reported, tmp_path):
    run = reported["run"]
    page = parse(run / "report.html")
    assert page.scripts == 0
    assert page.imgs and all(i["src"].startswith("data:image/png;base64,") for i in page.imgs)
    assert not re.search(r"(?:src|href)\s*=\s*['\"]?(?:https?:)?//", (run / "report.html").read_text())
    assert not [u for u in page.links if "//" in u]
    # linked mode: relative paths to files that exist
    assert main(["report", str(run), "--out", str(run / "linked.html"), "--link-images", "--no-png"]) == 0
    linked = parse(run / "linked.html")
    assert linked.imgs and not any(i["src"].startswith("data:") for i in linked.imgs)
    for i in linked.imgs:
        assert not i["src"].startswith("/") and (run / i["src"]).is_file(), i["src"]
    # --out a folder: its report.html, the data beside it
    assert main(["report", str(run), "--out", str(tmp_path / "pages"), "--link-images", "--no-png", "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["report.html", "report.json"]


def test_png_grid_has_a_row_per_image(reported):
    run = reported["run"]
    with Image.open(run / "report.png") as g:
        w, h = g.size
    data = json.loads((run / "report.json").read_text())
    cols = 1 + 3 + 3 + 3  # input, 3 stages, two edits of 3 strengths
    cell = 96  # 16 px images are enlarged to 96
    assert w >= cols * cell and h >= 3 * cell and h < 4 * cell + 60
    assert data["images_shown"] == 3


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const r = [...document.images].map(i => (i.complete && i.naturalWidth > 0) ? 'ok' : 'broken:' + i.alt);
  const p = document.createElement('pre'); p.id = 'imgcheck'; p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});
</script>"""


def chromium_image_check(page: Path, tmp: Path) -> list[str]:
    """Open ``page`` (a copy with a checking script, beside the original) in headless chromium; per <img>: 'ok' or
    'broken:ALT'."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    probe = page.with_name(".check_" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    try:
        out = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
             "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", "--dump-dom",
             probe.resolve().as_uri()],
            capture_output=True, text=True, timeout=3600,  # catches a hang only
        )  # fmt: skip
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r'<pre id="imgcheck">(.*?)</pre>', out.stdout, re.S)
    assert m, f"chromium gave no result (rc {out.returncode}): {out.stderr[-500:]}"
    return json.loads(m.group(1).replace("&quot;", '"'))


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="chromium is not installed (Debian package 'chromium', listed in scripts/apt-packages-test.txt)",
)
def test_every_image_loads_in_a_headless_browser(reported, tmp_path):
    run = reported["run"]
    for name, extra in (("report.html", []), ("browser_linked.html", ["--link-images"])):
        if extra:
            assert main(["report", str(run), "--out", str(run / name), "--no-png", *extra]) == 0
        n_img = len(parse(run / name).imgs)
        result = chromium_image_check(run / name, tmp_path)
        assert len(result) == n_img > 10
        assert all(r == "ok" for r in result), [r for r in result if r != "ok"]
    # the check itself can fail: a missing file is reported broken
    bad = run / "broken.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="nothere.png" alt="x"></body></html>')
    assert chromium_image_check(bad, tmp_path) == ["broken:x"]


def test_summaries_and_contents_come_first_and_the_per_image_table_sorts(reported):
    run = reported["run"]
    text = (run / "report.html").read_text()
    toc, metrics, per_image, images = (text.index(s) for s in ('<nav class="toc">', 'id="metrics"', 'id="per-image"',
                                                               'class="image"'))  # fmt: skip
    assert toc < metrics < per_image < images
    for anchor in re.findall(r'<nav class="toc"><ol>(.*?)</ol></nav>', text)[0].split("</li>"):
        m = re.search(r'href="#([^"]+)"', anchor)
        assert m is None or f'id="{m.group(1)}"' in text  # every contents entry leads somewhere
    # sorting without a script: a radio button per column and direction, a CSS rule ordering rows by a variable
    assert parse(run / "report.html").scripts == 0
    rows = re.findall(r'<tr style="([^"]+)" data-image="([^"]+)">(.*?)</tr>', text)
    results = {p.parent.name: json.loads(p.read_text()) for p in (run / "images").glob("*/result.json")}
    assert sorted(r[1] for r in rows) == sorted(results)
    header = re.search(r'id="per-image".*?<thead><tr>(.*?)</tr></thead>', text).group(1)
    titles = [re.sub(r"<.*?>|[▲▼]", "", h).strip() for h in header.split("</th>") if h]
    j = titles.index("tune MSE ↓")
    assert f"#sort-{j}a:checked~table.per-image tbody tr{{order:var(--{j}a)}}" in text
    for d, reverse in (("a", False), ("d", True)):
        pos = {name: int(re.search(rf"--{j}{d}:(\d+)", style).group(1)) for style, name, _ in rows}
        by_order = sorted(pos, key=pos.get)
        assert by_order == sorted(results, key=lambda n: results[n]["metrics"]["tune"]["mse"], reverse=reverse)


def test_thumbnails_link_the_full_images_and_commands_paste_back(reported, tmp_path):
    from cycle_encoding.report.html import _command, write_report

    run = reported["run"]
    small = write_report(run, run / "thumbs.html", png=False, plots=False, thumb=8)  # 16-px images, reduced to 8
    page = parse(small.html)
    text = small.html.read_text()
    linked = re.findall(r'<a href="([^"]+)" title="the full image"><img src="data:image/(?:png|jpeg);base64,', text)
    assert linked and all((run / f).is_file() for f in linked)
    assert page.scripts == 0
    assert _command({"argv": ["cycle-encoding", "edit", "my run", "--attribute", "Coat vs Pullover"]}) == (
        "cycle-encoding edit 'my run' --attribute 'Coat vs Pullover'"
    )


def test_a_large_image_is_inlined_as_a_small_thumbnail(tmp_path):
    from cycle_encoding.report.html import _Images

    yy, xx = np.mgrid[0:1024, 0:1024]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.float64)
    rgb += np.random.default_rng(0).normal(0, 12, rgb.shape)  # a photo's grain
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(tmp_path / "big.png")
    tag = _Images(tmp_path / "page.html", inline=True, root=tmp_path).tag(tmp_path / "big.png", "big")
    m = re.match(r'<a href="big.png" title="the full image"><img src="data:image/jpeg;base64,([^"]+)"', tag)
    assert m, tag[:120]
    import base64
    import io

    thumb = base64.b64decode(m.group(1))
    with Image.open(io.BytesIO(thumb)) as t:
        assert t.size == (256, 256)
    assert len(thumb) < (tmp_path / "big.png").stat().st_size / 20


def test_each_edit_has_a_gif_sweep(reported):
    run = reported["run"]
    doc = json.loads((run / "edits" / "smile" / "edit.json").read_text())
    rec = doc["images"][0]
    with Image.open(run / "edits" / "smile" / rec["gif"]) as g:
        assert g.format == "GIF" and g.n_frames == 4  # -2, 0, +2, 0 (and around again)
        g.seek(0)
        first = np.asarray(g.convert("L"))
        assert min(g.size) >= 128
    with Image.open(run / "edits" / "smile" / rec["files"][0]) as e:
        low = np.asarray(e.convert("L").resize(first.shape[::-1], Image.Resampling.NEAREST))
    assert np.abs(first.astype(int) - low.astype(int)).mean() < 8  # the first frame is the lowest strength
    assert "sweep (GIF)" in (run / "report.html").read_text()
