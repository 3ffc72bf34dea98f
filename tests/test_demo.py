"""The demo (scripts/demo.sh, the README's main command) and its committed sample images (examples/fashion-mnist/)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from scripts.make_demo_samples import CLASS_ORDER, choose, sample_name

from cycle_encoding.assets import MODELS_DIR
from cycle_encoding.data import fashion_mnist as fm
from cycle_encoding.data.images import list_images, read_image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "examples" / "fashion-mnist"
DEMO = ROOT / "scripts" / "demo.sh"
EDITS = ("coat-pullover", "ankle-boot-sneaker", "brightness")
STRENGTHS = 5  # each edit of the demo has 5 strengths (e.g. -6,-3,0,3,6)
NAME = re.compile(r"^test-(\d{5})-([a-z0-9-]+)\.png$")

needs_debian = pytest.mark.skipif(
    not (fm.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)


def sample_rows() -> list[dict[str, str]]:
    with open(SAMPLES / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


# -- the committed sample images ------------------------------------------------------------------------------------
def test_samples_folder_is_consistent():
    """labels.csv lists exactly the PNGs of the folder, each named test-INDEX-CLASS.png with its class's label."""
    rows = sample_rows()
    assert 8 <= len(rows) <= 12
    assert sorted(r["name"] for r in rows) == [p.name for p in list_images(SAMPLES)]
    for r in rows:
        m = NAME.match(r["name"])
        assert m, r["name"]
        label = int(r["label"])
        assert r["class"] == fm.CLASSES[label]
        assert r["name"] == sample_name(int(m.group(1)), label)
        x = read_image(SAMPLES / r["name"])
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    notice = (SAMPLES / "NOTICE.md").read_text(encoding="utf-8")
    for words in ("The MIT License (MIT)", "Copyright © 2017 Zalando SE, https://tech.zalando.com", "t10k"):
        assert words in notice


@needs_debian
def test_samples_equal_the_readers_test_images():
    """Each PNG reads back to exactly the tensor the Fashion-MNIST reader gives for its test index (28x28 padded to
    32x32 with -1.0), its label is the split's, and the choice is the documented one (first 2 of each class)."""
    ds = fm.FashionMNIST("test", size=32, channels=1)
    rows = sample_rows()
    expected = choose(ds.labels.tolist(), per_class=2, class_order=CLASS_ORDER)
    assert [int(NAME.match(r["name"]).group(1)) for r in rows] == expected
    for r in rows:
        i = int(NAME.match(r["name"]).group(1))
        assert int(r["label"]) == int(ds.labels[i])
        got = read_image(SAMPLES / r["name"])
        want = ds.load(i)
        assert torch.equal(got, want), r["name"]
        assert torch.all(got[:, :2] == -1.0) and torch.all(got[:, :, -2:] == -1.0)  # the padding is background


# -- a run made with shipped names ----------------------------------------------------------------------------------
def test_run_resolves_the_shipped_names_it_recorded(tmp_path: Path):
    """`invert --generator fmnist-generator` records the name; `edit` and `report` must find the shipped file."""
    from cycle_encoding.checkpoints.run_folder import RUN_FORMAT, InversionRun

    run = tmp_path / "run"
    run.mkdir()
    config = {"format": RUN_FORMAT, "generator": {"file": "fmnist-features"}, "encoder": {"file": "fmnist-eval"}}
    (run / "config.json").write_text(json.dumps(config))
    r = InversionRun(run)
    assert r.generator_file() == MODELS_DIR / "fmnist-features.safetensors"
    assert r.encoder_file() == MODELS_DIR / "fmnist-eval.safetensors"
    (run / "config.json").write_text(json.dumps({"format": RUN_FORMAT, "generator": {"file": "no-such-model"}}))
    assert InversionRun(run).generator_file() == Path("no-such-model")


# -- the demo end to end --------------------------------------------------------------------------------------------
def check_demo_output(out: Path, log: str = "") -> None:
    """What a finished demo leaves in ``out``: every sample inverted, an edit of each sample for each strength of
    each of the three directions, the report naming every sample."""
    names = [Path(r["name"]).stem for r in sample_rows()]
    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and not summary["failed"]
    assert sorted(summary["done"]) == sorted(names)
    assert summary["stages"] == ["encoder", "refine", "tune"]
    for name in names:
        for stage in ("encoder", "refine", "tune"):
            assert (run / "images" / name / f"recon_{stage}.png").is_file()
    for edit in EDITS:
        assert (out / "directions" / f"{edit}.safetensors").is_file()
        meta = json.loads((run / "edits" / edit / "edit.json").read_text())
        assert sorted(im["name"] for im in meta["images"]) == sorted(names)
        assert "lec" in meta["measures"]
        for name in names:
            pngs = sorted((run / "edits" / edit / name).glob("*.png"))
            assert len(pngs) == STRENGTHS, (edit, name, pngs)
            assert (run / "edits" / edit / f"{name}_strip.png").is_file()
    html = (run / "report.html").read_text(encoding="utf-8")
    for name in names:
        assert name in html, f"{name} missing from the report"
    for edit in EDITS:
        assert edit in html, f"edit {edit} missing from the report"
    assert (run / "report.png").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["images_finished"] == len(names)
    if log:
        assert "demo finished in" in log
        assert str(run / "report.html") in log
        check_editor_hint(log, run, out / "directions")


def check_editor_hint(log: str, run: Path, directions: Path) -> None:
    """The demo's last lines say how to open the browser editor on its run: a command that parses, naming the run and
    the three direction files, which an editor opens."""
    import shlex

    from cycle_encoding.cli import build_parser
    from cycle_encoding.editing.editor import Editor

    line = next(x for x in log.splitlines() if " ui " in x and "--directions" in x)
    argv = shlex.split(line.strip())
    assert Path(argv[0]).name == "cycle-encoding" and argv[1] == "ui"
    args = build_parser().parse_args(argv[1:])
    assert args.run_dir == run
    assert sorted(Path(f) for f in args.directions) == sorted(directions / f"{e}.safetensors" for e in EDITS)
    ed = Editor.open_run(args.run_dir, directions=args.directions, components=0)
    assert sorted(d.key for d in ed.directions()) == sorted(EDITS)


SHIPPED = ("fmnist-generator", "fmnist-encoder", "fmnist-features", "fmnist-eval")
missing_models = [n for n in SHIPPED if not (MODELS_DIR / f"{n}.safetensors").is_file()]


@pytest.mark.slow
@needs_debian
@pytest.mark.skipif(
    bool(missing_models),
    reason=f"shipped models not in the package yet: {', '.join(missing_models)} (src/cycle_encoding/assets/models/)",
)
def test_demo_end_to_end(tmp_path: Path):
    """`bash scripts/demo.sh OUT` with the shipped models (no overrides): a few minutes on 2 quiet CPU cores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env.setdefault("OMP_NUM_THREADS", "2")
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(DEMO), str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # no time limit: a loaded machine takes several times as long, and CI bounds the whole run
    assert proc.returncode == 0, proc.stdout[-4000:]
    print(proc.stdout[proc.stdout.rfind("[demo ") :])  # the last step and where everything is (pytest -rP shows it)
    check_demo_output(out, proc.stdout)
