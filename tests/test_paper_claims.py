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


def record(pos: int, mse: dict[str, float], success: dict[str, float], rows_present: tuple[str, ...]) -> dict:
    rows = {}
    for row in rows_present:
        rows[row] = {"mse": mse.get(row, 0.1), "ssim": 0.5, "perceptual": 10 * mse.get(row, 0.1), "identity": 0.9,
                     "lec": 20.0 + pos % 3, "seconds": 1.0, "edit_pullover-coat": success.get(row, 0.0),
                     "edit_pullover-coat@6": success.get(row, 0.0), "edit_brightness": 0.05}  # fmt: skip
    return {"position": pos, "index": pos, "label": 2, "rows": rows}


MAIN_ROWS = ("w", "e4e", "cycle-final", "cycle-all", "cycle-refine", "cycle-tune-noreg", "full", "pti")


def test_collect_averages_records_and_verdicts_follow_the_numbers(pc, tmp_path):
    recs = []
    for pos in range(12):
        jitter = 0.01 * (pos % 4)
        mse = {"w": 0.1 + jitter, "cycle-final": 0.06 + jitter + 0.002 * (pos % 2), "cycle-all": 0.1 + jitter,
               "full": 0.02 + jitter / 10, "pti": 0.0195 + jitter / 10, "cycle-refine": 0.08 + jitter,
               "cycle-refine-fresh": 0.1 + jitter}  # fmt: skip
        success = {"cycle-final": float(pos % 2), "w": float(pos % 2), "cycle-all": 0.0 if pos % 3 else 1.0,
                   "full": float(pos % 2), "pti": float(pos % 2)}  # fmt: skip
        recs.append(record(pos, mse, success, (*MAIN_ROWS, "cycle-refine-fresh")))
    (tmp_path / "shard-0.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    args = pc.parse_args(["--out", str(tmp_path)])
    result = pc.collect(args, tmp_path)
    assert result["images"] == 12
    rows = result["rows"]
    assert rows["cycle-final"]["mse"]["mean"] == pytest.approx(0.075 + 0.001)
    assert rows["cycle-final"]["edit_pullover-coat"]["mean"] == pytest.approx(0.5)
    # the standard error over images: the sample standard deviation / sqrt(n)
    vals = [r["rows"]["w"]["mse"] for r in recs]
    mean = sum(vals) / 12
    sd = (sum((v - mean) ** 2 for v in vals) / 11) ** 0.5
    assert rows["w"]["mse"]["se"] == pytest.approx(sd / 12**0.5)
    assert "full-fresh" not in rows and "cycle-zg-none" not in rows  # not measured / not asked for: left out
    text = "\n".join(pc.verdicts(rows, result["per_image"]))
    # lower distortion than W (beyond two standard errors), same success and LEC: holds
    assert "final stage vs the W encoder, lower distortion with W's editability: **holds**" in text
    # the same MSE as W: does not hold
    assert "all offsets vs the W encoder, lower distortion with W's editability: **does not hold**" in text
    assert "within 10% of PTI's MSE: **holds**" in text and "ratio 1.02" in text
    assert "edits better than PTI: **does not hold**" in text
    assert "restored Ranger state vs a fresh Ranger, pivot only: MSE 0.0950 vs 0.1150" in text
    assert "MSE 0.0950 vs 0.1150 (difference -0.0200 ± 0.0000): better" in text
    # the page: every measured row in the table, the wall time summed over the invocations that measured
    d = {"attribute": None, "positives": 100, "negatives": 100, "val_accuracy": 0.9, "sigma": 2.0}
    result.update(directions={"brightness": d}, options=vars(args), wall_seconds=600.0, invocations=2)
    page = pc.markdown(result, None, tmp_path)
    assert "(10 min of wall time on a 2-core CPU machine over 2 invocations," in page
    assert "- **Images**: 12 Fashion-MNIST test images (of the 200 chosen: the rest not measured yet" in page
    assert "| W encoder (`w`) | 0.1150 ±0.0034 |" in page
    assert sum(line.startswith("| ") for line in page.splitlines()) == 1 + len(MAIN_ROWS) + 1


def test_paired_comparison_calls_noise_equal(pc):
    recs = [{"rows": {"a": {"mse": 0.1 + 0.01 * (i % 2)}, "b": {"mse": 0.1 + 0.01 * ((i + 1) % 2)}}} for i in range(10)]
    word, text = pc.compare(recs, "a", "b", "mse", True)
    assert word == "equal within noise" and "difference +0.0000" in text
    recs = [{"rows": {"a": {"mse": 0.2 + 0.001 * i}, "b": {"mse": 0.1}}} for i in range(10)]
    assert pc.compare(recs, "a", "b", "mse", True)[0] == "worse"
    assert pc.compare(recs, "a", "b", "mse", False)[0] == "better"


def test_hand_written_part_survives_a_rewrite(pc, tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("old table\n" + pc.MARKER + "\nmy reading\n")
    kept = page.read_text().split(pc.MARKER, 1)[1]
    assert kept.strip() == "my reading"
    assert pc.command_line({**vars(pc.parse_args([])), "workers": 2}) == "python scripts/paper_claims.py --workers 2"


def test_a_rerun_measures_only_the_rows_an_image_lacks_or_holds_from_other_inputs(pc, tmp_path):
    chosen = [(100 + pos, pos % 3) for pos in range(8)]
    rows = pc.active_rows(pc.parse_args(["--cycle-zg", "zg.safetensors"]))
    keys = [r.key for r in rows]
    assert "cycle-zg-none" in keys
    prints = {key: "new" for key in keys}

    def rec(pos, present, fp="new", mse=0.1):
        r = record(pos, {k: mse for k in present}, {}, present)
        return {**r, "fingerprints": dict.fromkeys(present, fp)}

    without_zg = tuple(k for k in keys if k != "cycle-zg-none")
    # worker 1 of 2 owns positions 1, 3, 5, 7: 1 lacks the zg row; 3 has every row (in two records); 5 has none;
    # 7 has every row but its W row is from another W encoder (as 3's was, measured again later)
    without_w = tuple(k for k in keys if k != "w")
    recs = [rec(1, without_zg), rec(3, without_zg), rec(3, ("cycle-zg-none",), mse=0.5), rec(7, without_w),
            rec(7, ("w",), fp="old"), rec(3, ("w",), fp="old"), rec(3, ("w",), mse=0.3)]  # fmt: skip
    shard = tmp_path / "shard-1.jsonl"
    shard.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    todo = pc.pending(pc.read_records([shard]), chosen, rows, prints, 1, 2)
    assert [(pos, i, lab) for pos, i, lab, _ in todo] == [(1, 101, 1), (5, 105, 2), (7, 107, 1)]
    assert [[r.key for r in t[3]] for t in todo] == [["cycle-zg-none"], keys, ["w"]]
    assert pc.pending(pc.read_records([tmp_path / "absent.jsonl"]), chosen, rows, prints, 0, 2)[0][3] == rows
    # a changed setting or model changes the fingerprints: everything is measured again
    assert len(pc.pending(pc.read_records([shard]), chosen, rows, dict.fromkeys(keys, "other"), 1, 2)) == 4
    # another --workers: worker 1 of 4 (positions 1, 5) reads every shard, so only 1's and 5's missing rows remain
    both = pc.read_records([tmp_path / "shard-0.jsonl", shard])
    assert [(t[0], len(t[3])) for t in pc.pending(both, chosen, rows, prints, 1, 4)] == [(1, 1), (5, len(rows))]
    # the collection: one record per image, later records replace earlier rows, rows from other inputs left out
    merged = pc.merge_records(recs, prints)
    assert [r["position"] for r in merged] == [1, 3, 7]
    assert set(merged[1]["rows"]) == set(keys)
    assert merged[1]["rows"]["cycle-zg-none"]["mse"] == 0.5 and merged[1]["rows"]["w"]["mse"] == 0.3
    assert "w" not in merged[2]["rows"] and len(merged[2]["rows"]) == len(keys) - 1
    assert recs[2]["rows"].keys() == {"cycle-zg-none"}  # the inputs are left as they were


def test_fingerprints_follow_a_rows_models_and_the_settings(pc, tmp_path):
    for name in ("g", "w1", "w2", "e", "c"):
        (tmp_path / f"{name}.pt").write_bytes(name.encode())
    f = lambda *extra: pc.fingerprints(pc.parse_args(  # noqa: E731
        ["--generator", str(tmp_path / "g.pt"), "--w", str(tmp_path / "w1.pt"), "--e4e", str(tmp_path / "e.pt"),
         "--cycle", str(tmp_path / "c.pt"), *extra]))  # fmt: skip
    base, other_w, longer = f(), f("--w", str(tmp_path / "w2.pt")), f("--tune-steps", "100")
    assert {k for k in base if base[k] != other_w[k]} == {"w"}  # only the W row uses the W encoder
    assert all(base[k] != longer[k] for k in base)
    assert pc.row_encoders(next(r for r in pc.ROWS if r.key == "full")) == ["cycle"]
    assert pc.row_encoders(next(r for r in pc.ROWS if r.key == "pti")) == ["cycle"]  # LEC with the Cycle encoder


def test_rows_option_measures_a_subset_and_refuses_unknown_keys(pc, capsys):
    assert [r.key for r in pc.active_rows(pc.parse_args(["--rows", "w,cycle-final"]))] == ["w", "cycle-final"]
    assert len(pc.active_rows(pc.parse_args([]))) == len(pc.ROWS) - 1  # all but the one needing --cycle-zg
    assert [r.key for r in pc.active_rows(pc.parse_args(["--rows", "cycle-zg-none"]))] == []  # no --cycle-zg given
    with pytest.raises(SystemExit):
        pc.parse_args(["--rows", "w,bogus"])
    assert "unknown row(s) bogus" in capsys.readouterr().err
