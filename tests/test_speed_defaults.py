"""``invert``'s speed defaults: ``plan_speed``'s choices, ``--exact`` equal bit for bit to the authors' loop as the
Python API runs it with the explicit options, the plain command printing and recording its choice, a resumed run
keeping its batched pass, and worker processes writing the same files as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cycle_encoding.checkpoints.native import read_native
from cycle_encoding.cli import main
from cycle_encoding.config import to_dict
from cycle_encoding.inversion import Inverter
from cycle_encoding.inversion.speed import SPEED_OPTIONS, plan_speed
from cycle_encoding.inversion.workers import finish_workers, start_workers
from cycle_encoding.losses.perceptual import register_perceptual, unregister_perceptual
from tests.conftest import stand_in_perceptual, write_inversion_files

pytestmark = pytest.mark.usefixtures("one_thread")

STANDIN = "test-speed-stand-in"
FAST = {"refine": {"steps": 3, "num_random": 3, "lr": 1e-3}, "tune": {"steps": 5, "lr": 3e-3, "locality_alpha": 3.0}}
FAST_ARGS = ["--refine-steps", "3", "--refine-random", "3", "--refine-lr", "1e-3", "--tune-steps", "5",
             "--tune-lr", "3e-3", "--locality-alpha", "3", "--identity", "none", "--device", "cpu"]  # fmt: skip
GB = 1 << 30


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A generator file, an encoder file that records its training images, a folder of 4 targets."""
    root = write_inversion_files(tmp_path_factory.mktemp("speed"))
    register_perceptual(STANDIN, lambda device, weights: stand_in_perceptual().to(device), "tests", replace=True)
    yield root
    unregister_perceptual(STANDIN)


def cli(root: Path, out: Path, *extra: str) -> list[str]:
    return ["invert", str(root / "targets"), "--generator", str(root / "g.safetensors"), "--encoder",
            str(root / "e.safetensors"), "--out", str(out), *FAST_ARGS, *extra]  # fmt: skip


def outputs(run: Path) -> dict[str, dict]:
    """Per image: the pivots, the tuned generator's stored change, the reconstructions' hashes and the losses."""
    out = {}
    for d in sorted((run / "images").iterdir()):
        if d.is_dir():
            res = json.loads((d / "result.json").read_text())
            out[d.name] = {
                "pivots": read_native(d / "pivots.safetensors").tensors,
                "delta": read_native(d / "generator_delta.safetensors").tensors,
                "recon": res["recon_sha256"],
                "tuned": res["delta"]["tuned_weights_sha256"],
                "losses": (d / "losses.jsonl").read_text(),
            }
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        x, y = a[name], b[name]
        assert x["recon"] == y["recon"] and x["tuned"] == y["tuned"] and x["losses"] == y["losses"], name
        for k in ("pivots", "delta"):
            assert x[k].keys() == y[k].keys() and all(torch.equal(x[k][t], y[k][t]) for t in x[k]), (name, k)


def test_the_plan_follows_the_measured_rules():
    one = plan_speed(1, 32, "cpu", cores=2, memory=64 * GB)
    assert (one.workers, one.threads) == (1, 2)  # one image: all cores' threads, as torch's default, not fewer
    many = plan_speed(24, 32, "cpu", cores=2, memory=64 * GB)
    assert (many.workers, many.threads, many.batch_passes) == (2, 1, True)
    assert many.tune_batch == 6  # 12 images per process in batches of 6: the two processes' shares stay even
    assert plan_speed(24, 32, "cpu", cores=1, memory=64 * GB).tune_batch == 8
    assert plan_speed(24, 32, "cpu", cores=2, memory=1 * GB).workers == 1  # memory for one process only
    # a process holding 9 GB (Method 2's big encoder and its Ranger state) and 4 GB of work at 256 px each
    assert plan_speed(8, 256, "cpu", cores=2, memory=16 * GB, held=9 * GB).workers == 1
    assert plan_speed(8, 256, "cpu", cores=2, memory=17 * GB, held=9 * GB).workers == 2
    big = plan_speed(3, 256, "cpu", cores=2, memory=64 * GB)
    assert (big.workers, big.threads, big.batch_passes, big.tune_batch) == (1, 2, False, 1)  # 2+1 splits unevenly
    assert plan_speed(8, 256, "cpu", cores=2, memory=64 * GB).workers == 2
    gpu = plan_speed(24, 32, "cuda", cores=2, memory=64 * GB)
    assert (gpu.workers, gpu.batch_passes, gpu.tune_batch, gpu.compile) == (1, False, 1, False)
    assert plan_speed(24, 32, "cpu", cores=2, memory=64 * GB, single_process="under torchrun").workers == 1
    # compiling: where it paid (bf16 CPUs), over a large folder, with a compiler
    assert plan_speed(64, 32, "cpu", "bf16", cores=2, memory=64 * GB, compiler=True).compile
    assert not plan_speed(64, 32, "cpu", "bf16", cores=2, memory=64 * GB, compiler=False).compile
    assert not plan_speed(64, 32, "cpu", "fp32", cores=2, memory=64 * GB, compiler=True).compile
    assert not plan_speed(4, 32, "cpu", "bf16", cores=2, memory=64 * GB, compiler=True).compile
    given = plan_speed(24, 32, "cpu", cores=2, memory=64 * GB, given={"batch_passes": False, "workers": 1})
    assert (given.batch_passes, given.workers, given.threads, given.why["workers"]) == (False, 1, 2, "given")
    exact = plan_speed(24, 32, "cpu", cores=2, memory=64 * GB, exact=True)
    assert exact.exact and (exact.batch_passes, exact.tune_batch, exact.compile, exact.workers) == (False, 1, False, 1)
    assert exact.threads is None and set(exact.why) == set(SPEED_OPTIONS)
    with pytest.raises(ValueError, match="--exact"):
        plan_speed(24, 32, "cpu", exact=True, given={"tune_batch": 4})


def test_exact_is_the_authors_loop_bit_for_bit(files, tmp_path, capsys):
    """``--exact`` against an independent run of the same functions with the options the authors' loop had before
    the speed defaults (fp32, no batched pass, tuning one by one, nothing compiled, one process)."""
    assert main(cli(files, tmp_path / "exact", "--perceptual", STANDIN, "--exact")) == 0
    err = capsys.readouterr().err
    assert "speed (--exact): one process" in err and "refine fp32" in err and "tune fp32" in err
    inv = Inverter(files / "g.safetensors", files / "e.safetensors", device="cpu", perceptual=STANDIN, identity="none",
                   stages=("encoder", "refine", "tune"), tune_batch=1,
                   refine={**FAST["refine"], "precision": "fp32", "compile": False},
                   tune={**FAST["tune"], "precision": "fp32", "batch_passes": False, "compile": False})  # fmt: skip
    inv.run(files / "targets", tmp_path / "api", verbose=False)
    assert_same(outputs(tmp_path / "exact"), outputs(tmp_path / "api"))
    speed = json.loads((tmp_path / "exact" / "config.json").read_text())["speed"]
    assert speed["exact"] and speed["workers"] == 1 and speed["threads"] is None
    assert main(cli(files, tmp_path / "x", "--exact", "--batch-passes")) == 2
    assert "--exact" in capsys.readouterr().err


def test_the_plain_command_prints_records_and_keeps_its_choice(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(cli(files, run, "--perceptual", "none", "--workers", "1")) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("speed: "))
    assert (
        "batched pass on (faster at 16 px)" in line and "tune batch 4" in line and "workers" not in line.split(";")[0]
    )
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["speed"]["batch_passes"] and cfg["options"]["tune"]["batch_passes"] and cfg["options"]["tune_batch"] == 4
    results = [json.loads(p.read_text()) for p in sorted(run.glob("images/*/result.json"))]
    assert len(results) == 4 and all(r["tune"]["batch"] == 4 for r in results)
    # a folder made by the authors' loop, resumed by the plain command: its batched pass (off) is kept, not refused
    old = tmp_path / "old"
    assert main(cli(files, old, "--perceptual", "none", "--exact")) == 0
    (old / "images" / "img3" / "done").unlink()
    capsys.readouterr()
    assert main(cli(files, old, "--perceptual", "none")) == 0
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("speed: "))
    assert "batched pass off (as the run folder being resumed records)" in line


def test_worker_processes_write_what_one_process_writes(files, tmp_path):
    """A worker process (a fresh interpreter) given the whole folder writes the same files, bit for bit, as this
    process does with the same options and one thread; and a run with two workers inverts every image once."""
    opts = {"stages": ("encoder", "refine", "tune"), "perceptual": "none", "identity": "none", **FAST}
    inv = Inverter(files / "g.safetensors", files / "e.safetensors", device="cpu", **opts)
    one = inv.run(
        files / "targets", tmp_path / "one", verbose=False, speed={"workers": 1, "threads": 1, "tune_batch": 1}
    )
    assert one["complete"]
    # the worker alone on a fresh folder made ready by this process (config.json, images/)
    inv2 = Inverter(files / "g.safetensors", files / "e.safetensors", device="cpu", **opts)
    inv2.run(files / "targets", tmp_path / "w", verbose=False, speed={"workers": 1, "threads": 1, "tune_batch": 1})
    for d in (tmp_path / "w" / "images").iterdir():
        if d.is_dir():
            (d / "done").unlink()
    names = [f"img{i}" for i in range(4)]
    task = {**inv._rebuild, "options": to_dict(inv.config), "names": names, "todo": list(range(4)),
            "images": [str(files / "targets" / f"{n}.png") for n in names], "out": str(tmp_path / "w"),
            "verbose": False, "debug": False, "max_pixels": 10**8}  # fmt: skip
    (rec,) = finish_workers(start_workers(task, 1, 1), print)
    assert sorted(rec["done"]) == names and rec["worker"] == 2
    assert_same(outputs(tmp_path / "one"), outputs(tmp_path / "w"))
    # two processes on one folder: every image once, the same files
    two = inv.run(
        files / "targets", tmp_path / "two", verbose=False, speed={"workers": 2, "threads": 1, "tune_batch": 1}
    )
    done = [n for r in two["ranks"] for n in r["done"]]
    assert sorted(done) == names and two["complete"] and not two["busy"] and len(two["ranks"]) == 2
    assert_same(outputs(tmp_path / "one"), outputs(tmp_path / "two"))
