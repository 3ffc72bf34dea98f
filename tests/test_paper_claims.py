"""scripts/paper_claims.py: the image selection, the collection of per-image records and the claims' verdicts (the
measuring itself runs the library's stages, tested elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def pc():
    spec = importlib.util.spec_from_file_location("paper_claims", ROOT / "scripts" / "paper_claims.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["paper_claims"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not (DEBIAN / "t10k-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_selection_is_the_first_images_of_each_class(pc):
    import numpy as np

    from cycle_encoding.data.fashion_mnist import CLASSES, load_split

    chosen = pc.select_images(40, 40)
    _, labels = load_split("test")
    assert len(chosen) == 200 and len({i for i, _ in chosen}) == 200
    for name in pc.EDIT_CLASSES:
        k = CLASSES.index(name)
        mine = [i for i, lab in chosen if lab == k]
        assert mine == list(np.flatnonzero(labels == k)[:40])
    assert all(int(labels[i]) == lab for i, lab in chosen)
    others = [lab for _, lab in chosen if CLASSES[lab] not in pc.EDIT_CLASSES]
    assert len(others) == 40 and len(set(others)) == 6


def record(pos: int, mse: dict[str, float], success: dict[str, float]) -> dict:
    rows = {}
    for row in ("w", "e4e", "cycle-final", "cycle-all", "cycle-refine", "cycle-tune-noreg", "full", "pti"):
        rows[row] = {"mse": mse.get(row, 0.1), "ssim": 0.5, "perceptual": 10 * mse.get(row, 0.1), "identity": 0.9,
                     "lec": 20.0, "seconds": 1.0, "edit_pullover-coat": success.get(row, 0.0),
                     "edit_pullover-coat@6": success.get(row, 0.0), "edit_brightness": 0.05}  # fmt: skip
    return {"position": pos, "index": pos, "label": 2, "rows": rows}


def test_collect_averages_records_and_verdicts_follow_the_numbers(pc, tmp_path):
    recs = [record(0, {"cycle-final": 0.05, "w": 0.1, "full": 0.02, "pti": 0.019}, {"cycle-final": 1.0}),
            record(1, {"cycle-final": 0.07, "w": 0.1, "full": 0.02, "pti": 0.021}, {"cycle-final": 0.0})]  # fmt: skip
    (tmp_path / "shard-0.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    args = pc.parse_args(["--out", str(tmp_path)])
    result = pc.collect(args, tmp_path)
    assert result["images"] == 2
    assert result["rows"]["cycle-final"]["mse"]["mean"] == pytest.approx(0.06)
    assert result["rows"]["cycle-final"]["edit_pullover-coat"]["mean"] == pytest.approx(0.5)
    text = "\n".join(pc.verdicts(result["rows"]))
    assert "final stage reconstructs better than the W encoder: **holds**" in text
    assert "final stage edits better than e4e: **holds**" in text
    assert "all offsets reconstructs better than the W encoder: **does not hold**" in text
    assert "reconstructs close to PTI" in text and "(ratio 1.00)" in text
    assert "edits better than PTI: **does not hold**" in text


def test_hand_written_part_survives_a_rewrite(pc, tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("old table\n" + pc.MARKER + "\nmy reading\n")
    kept = page.read_text().split(pc.MARKER, 1)[1]
    assert kept.strip() == "my reading"
    assert pc.command_line({**vars(pc.parse_args([])), "workers": 2}) == "python scripts/paper_claims.py --workers 2"
