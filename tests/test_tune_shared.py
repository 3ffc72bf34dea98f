"""One generator tuned on many images (``pivotal_tune_shared``, PTI's multi-ID mode) against an independent
re-implementation of PTI's multi-ID loop written here in plain torch: its own copy of G and its own Adam over
``G.parameters()``, for each round each image in order: one render of its pivot, MSE + perceptual, the locality
regularizer (a mapped random code truncated at 0.5, moved to distance alpha from the pivot, rendered without noise by
the tuned and the frozen G) when the global step counter hits the interval, ``zero_grad``, ``backward``, ``step``.

The two loops do the same float32 operations in the same order on the same tensors (the same renders, the same
reductions, the same Adam), so every step's loss and the final weights agree bit for bit; the tests ask for exact
equality. (Were an operation to sum in another order, e.g. a batched render, they would differ by float rounding,
~1e-6 relative, and this test would say so by failing.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.inversion.common import LossNetworks
from cycle_encoding.inversion.tune import TuneConfig, pivotal_tune
from cycle_encoding.inversion.tune_shared import load_state, pivotal_tune_shared, save_state
from tests.conftest import make_tiny_generator, own_images, stand_in_perceptual

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = [21, 22, 23]


@pytest.fixture(scope="module")
def tiny():
    G = make_tiny_generator(resolution=16)
    xs = own_images(G, 3, seed=7)
    with torch.no_grad():
        piv = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(5)), truncation=0.7)
    return {"G": G, "P": stand_in_perceptual(), "pivots": list(piv[:, None]), "targets": list(xs[:, None])}


def pti_multi_id(G, P, pivots, targets, seeds, steps, lr, every, alpha, l2=1.0, perc=1.0, reg_l2=0.1, reg_p=0.1):
    """PTI's multi-ID coach re-written: returns (the tuned G, each step's loss in order)."""
    Gt = copy.deepcopy(G)
    Gt.requires_grad_(True)
    G.requires_grad_(False)
    opt = torch.optim.Adam(Gt.parameters(), lr=lr, betas=(0.9, 0.999))
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # each image's regularizer draws
    losses = []
    training_step = 0
    for _ in range(steps):
        for w, x, gen in zip(pivots, targets, gens):
            y = Gt.synthesis(w, noise_mode="const")
            loss = l2 * F.mse_loss(y, x) + perc * P(y, x).mean()
            if training_step % every == 0:
                z = torch.randn(1, G.z_dim, generator=gen)
                with torch.no_grad():
                    wz = G.mapping(z, truncation=0.5)
                d = wz - w
                wr = w + alpha * d / d.norm()
                new = Gt.synthesis(wr, noise_mode="none")
                with torch.no_grad():
                    old = G.synthesis(wr, noise_mode="none")
                loss = loss + (reg_l2 * F.mse_loss(new, old) + reg_p * P(new, old).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            training_step += 1
    G.requires_grad_(True)
    return Gt, losses


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("every", [1, 3])
def test_shared_tuning_equals_ptis_multi_id_loop_step_by_step(tiny, every):
    cfg = TuneConfig(steps=4, lr=3e-3, locality_alpha=3.0, locality_every=every)
    seen: list[tuple[int, dict]] = []
    res = pivotal_tune_shared(tiny["G"], tiny["pivots"], tiny["targets"], LossNetworks(tiny["P"]), cfg, SEEDS,
                              on_step=lambda i, r: seen.append((i, r)))  # fmt: skip
    ref_G, ref_losses = pti_multi_id(tiny["G"], tiny["P"], tiny["pivots"], tiny["targets"], SEEDS, steps=4, lr=3e-3,
                                     every=every, alpha=3.0)  # fmt: skip
    # the steps in PTI's order: round by round, image by image, the global counter over all of them
    assert [i for i, _ in seen] == [0, 1, 2] * 4
    assert [r["step"] for _, r in seen] == list(range(12))
    assert [r["round"] for _, r in seen] == [k // 3 for k in range(12)]
    assert [("locality" in r) for _, r in seen] == [g % every == 0 for g in range(12)]
    assert [r["loss"] for _, r in seen] == ref_losses
    assert [r for i, r in seen if i == 1] == res.losses[1]
    assert weights_equal(res.generator, ref_G)
    assert (res.rounds, res.updates) == (4, 12)


def test_shared_tuning_lowers_every_images_loss_and_leaves_g_alone(tiny):
    G = tiny["G"]
    before = copy.deepcopy(G.state_dict())
    cfg = TuneConfig(steps=12, lr=3e-3, locality_alpha=3.0)
    res = pivotal_tune_shared(G, tiny["pivots"], tiny["targets"], LossNetworks(tiny["P"]), cfg, SEEDS)
    for recs in res.losses:
        assert len(recs) == 12
        assert recs[-1]["l2"] < 0.5 * recs[0]["l2"]
        assert recs[-1]["perceptual"] < recs[0]["perceptual"]
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())
    mapped = {k for k, v in res.generator.state_dict().items() if not torch.equal(v, before[k])}
    assert mapped and not any(k.startswith("mapping") for k in mapped)  # the mapping network gets no gradient


def test_one_image_shared_is_pivotal_tune_without_early_stop(tiny):
    cfg = TuneConfig(steps=5, lr=3e-3, locality_alpha=3.0, stop_threshold=None, locality_noise_mode="random")
    nets = LossNetworks(tiny["P"])
    one = pivotal_tune(tiny["G"], tiny["pivots"][0], tiny["targets"][0], nets, cfg, seed=SEEDS[0])
    shared = pivotal_tune_shared(tiny["G"], tiny["pivots"][:1], tiny["targets"][:1], nets, cfg, SEEDS[:1])
    assert weights_equal(one.generator, shared.generator)
    assert [{k: v for k, v in r.items() if k != "round"} for r in shared.losses[0]] == one.losses


def test_shared_tuning_ignores_the_stop_threshold(tiny):
    """No early stop in multi-ID mode (PTI): a threshold every image meets from the first step changes nothing."""
    nets = LossNetworks(tiny["P"])
    runs = [pivotal_tune_shared(tiny["G"], tiny["pivots"][:2], tiny["targets"][:2], nets,
                                TuneConfig(steps=3, lr=3e-3, stop_threshold=t), SEEDS[:2]) for t in (None, 1e9)]  # fmt: skip
    assert runs[1].updates == 6 and weights_equal(runs[0].generator, runs[1].generator)


def test_resumed_from_a_saved_state_ends_bit_for_bit_as_uninterrupted(tiny, tmp_path):
    cfg = TuneConfig(steps=5, lr=3e-3, locality_alpha=3.0, locality_noise_mode="random")
    nets = LossNetworks(tiny["P"])
    args = (tiny["G"], tiny["pivots"], tiny["targets"], nets, cfg, SEEDS)
    keys = ["a", "b", "c"]
    saved = []

    def on_save(st):
        saved.append(st.rounds)
        save_state(tmp_path / f"state{st.rounds}.pt", st)

    whole = pivotal_tune_shared(*args, keys=keys, save_every=2, on_save=on_save)
    assert saved == [2, 4]  # every 2 rounds, not after the last
    st = load_state(tmp_path / "state2.pt")
    assert st.rounds == 2 and [len(r) for r in st.losses] == [2, 2, 2]
    resumed = pivotal_tune_shared(*args, keys=keys, resume=st)
    assert weights_equal(whole.generator, resumed.generator)
    assert resumed.losses == whole.losses
    with pytest.raises(CycleEncodingError, match="other image"):
        pivotal_tune_shared(*args, keys=["a", "b", "x"], resume=st)


# -- into a run folder: invert --tune shared, and every reader of runs on its result --------------------------------

STANDIN = "test-tune-shared-stand-in"
FAST = {"identity": "none", "refine": {"steps": 3, "num_random": 2, "lr": 1e-3},
        "tune": {"steps": 4, "lr": 3e-3, "locality_alpha": 3.0}}  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A generator file, an encoder file that records its training images, 4 targets and one unreadable file."""
    from cycle_encoding.losses.perceptual import register_perceptual, unregister_perceptual
    from tests.conftest import write_inversion_files

    root = write_inversion_files(tmp_path_factory.mktemp("shared"))
    (root / "targets" / "img4.png").write_bytes(b"not a png")
    register_perceptual(STANDIN, lambda d, w: stand_in_perceptual().to(d), "tests", replace=True)
    yield root
    unregister_perceptual(STANDIN)


def shared_inverter(root, **kw):
    from cycle_encoding.inversion import Inverter

    opts = {"stages": ("encoder", "refine", "tune"), "perceptual": STANDIN, **FAST, "tune_mode": "shared", **kw}
    return Inverter(root / "g.safetensors", root / "e.safetensors", device="cpu", **opts)


def run_outputs(run) -> dict:
    """What must not depend on interruptions: each image's record, losses and pivots, the shared generator."""
    import json

    from cycle_encoding.checkpoints.native import read_native

    out = {"shared": {k: v for k, v in json.loads((run / "shared.json").read_text()).items() if k != "delta"}}
    out["tuned"] = json.loads((run / "shared.json").read_text())["delta"]["tuned_weights_sha256"]
    for d in sorted((run / "images").iterdir()):
        if d.is_dir() and (d / "done").is_file():
            res = json.loads((d / "result.json").read_text())
            out[d.name] = {"result": {k: res.get(k) for k in ("metrics", "recon_sha256", "tune", "refine", "index")},
                           "losses": (d / "losses.jsonl").read_text(),
                           "pivots": {k: v.tolist() for k, v in read_native(d / "pivots.safetensors").tensors.items()}}  # fmt: skip
    return out


def test_method2_shared_run_stores_one_generator_that_every_reader_uses(files, tmp_path):
    """encoder -> refine -> tune, shared: one change stored for the run, every image's record refers to it, the
    generator is ``pivotal_tune_shared`` on the stored pivots (bit for bit), and edit, export, report, the editor
    and the run reader all render each image with it (its reconstruction hash, bit for bit)."""
    import json

    from cycle_encoding.checkpoints.delta import weights_sha256
    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.checkpoints.native import read_native
    from cycle_encoding.checkpoints.run_folder import InversionRun, tensor_sha256
    from cycle_encoding.cli import main
    from cycle_encoding.editing.editor import Editor
    from cycle_encoding.inversion.common import render, stage_seed

    run = tmp_path / "run"
    inv = shared_inverter(files)
    summary = inv.run(files / "targets", run, log=lambda s: None)
    names = [f"img{i}" for i in range(4)]
    assert summary["done"] == names and [f["name"] for f in summary["failed"]] == ["img4"]
    shared = json.loads((run / "shared.json").read_text())
    assert [k.split(":")[0] for k in shared["images"]] == names and shared["updates"] == 16 == 4 * shared["rounds"]
    assert summary["shared_generator"]["delta"]["file_sha256"] == shared["delta"]["file_sha256"]
    assert summary["generator_delta"]["mean_bytes_per_image"] == shared["delta"]["file_bytes"] / 4
    assert not list((run / "images").glob("*/generator_delta.safetensors"))
    # the loop itself on the run's own pivots, targets and seeds gives the stored generator
    pivots = [read_native(run / "images" / n / "pivots.safetensors").tensors["refine"][None] for n in names]
    xs = [inv.load_image(files / "targets" / f"{n}.png") for n in names]
    seeds = [stage_seed(0, i, "tune") for i in range(4)]
    ref = pivotal_tune_shared(inv.G, pivots, xs, inv.nets, inv.config.tune, seeds).generator
    assert weights_sha256(ref) == shared["delta"]["tuned_weights_sha256"]
    reader = InversionRun(run)
    base = reader.load_generator()
    gens = []
    for n in names:
        im = reader.image(n)
        assert im.result["delta"]["file"] == "../../generator_delta.safetensors" and im.result["tune"]["shared"]
        G, which = reader.generator_for(im, base)
        gens.append(G)
        assert which == "tuned" and tensor_sha256(render(G, im.pivot)) == im.recon_sha256
    assert all(g is gens[0] for g in gens)  # rebuilt once for the run
    assert main(["edit", str(run), "--direction", "sefa", "--strengths", "-1,0,1", "--out", str(tmp_path / "e"),
                 "--no-gif", "--quiet"]) == 0  # fmt: skip
    edit = json.loads((tmp_path / "e" / "edit.json").read_text())
    assert all(r["reconstruction_hash_matches"] for r in edit["images"]) and len(edit["images"]) == 4
    assert main(["export", str(run), "img2", "--format", "safetensors", "--out", str(tmp_path / "t.safetensors")]) == 0
    assert weights_sha256(load_generator(tmp_path / "t.safetensors")) == shared["delta"]["tuned_weights_sha256"]
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--no-png", "--no-plots"]) == 0
    ed = Editor.open_run(run, "img1", components=1, methods=("sefa",))
    g1 = ed.tuned
    ed.open_image("img3")
    assert ed.tuned is g1 and weights_sha256(g1) == shared["delta"]["tuned_weights_sha256"]


def test_stages_before_tuning_resume_per_image_and_a_finished_run_takes_no_new_image(files, tmp_path, monkeypatch):
    """Interrupted during the third image's refinement: a re-run keeps the two pivoted images (their stages are
    not redone) and ends as an uninterrupted run. A finished run then refuses a new image (it fails, naming what to
    do) and leaves the others as they were."""
    import shutil

    from cycle_encoding.inversion.inverter import Inverter

    targets = tmp_path / "targets"
    shutil.copytree(files / "targets", targets)
    (targets / "img4.png").unlink()
    ref = tmp_path / "ref"
    shared_inverter(files).run(targets, ref, log=lambda s: None)
    real, calls = Inverter._pivot_stages, []

    def interrupted(self, x, index, *a):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, x, index, *a)

    monkeypatch.setattr(Inverter, "_pivot_stages", interrupted)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        shared_inverter(files).run(targets, run, log=lambda s: None)
    assert [(run / "images" / f"img{i}" / "pivoted").is_file() for i in range(3)] == [True, True, False]
    calls.clear()
    summary = shared_inverter(files).run(targets, run, log=lambda s: None)
    assert calls == [2, 3] and summary["complete"]
    assert run_outputs(run) == run_outputs(ref)
    shutil.copy(targets / "img0.png", targets / "img9.png")
    before = {n: (run / "images" / n / "done").stat().st_mtime_ns for n in ("img0", "img1")}
    lines: list[str] = []
    summary = shared_inverter(files).run(targets, run, log=lines.append)
    assert [f["name"] for f in summary["failed"]] == ["img9"] and "another --out" in summary["failed"][0]["reason"]
    assert summary["skipped"] == ["img0", "img1", "img2", "img3"] and not summary["done"]
    assert {n: (run / "images" / n / "done").stat().st_mtime_ns for n in ("img0", "img1")} == before
    assert run_outputs(run) == run_outputs(ref)


def test_shared_tuning_killed_with_sigkill_goes_on_from_its_saved_state(files, tmp_path):
    """Method 1 with PTI's projector (``--stages project,tune --tune shared``) in a process killed by SIGKILL in the
    middle of the shared tuning, after it saved a state: the re-run goes on from that state (it says after which
    round) and ends bit for bit as an uninterrupted run (the state holds the weights, Adam's moments and step
    counts and every image's random state; the CPU computes the same operations on one thread either way)."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    targets = tmp_path / "targets"
    shutil.copytree(files / "targets", targets)
    (targets / "img4.png").unlink()
    opts = tmp_path / "opts.json"
    opts.write_text(json.dumps({"tune_save_every": 1}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "cycle_encoding.cli", "invert", str(targets), "--generator",
                str(files / "g.safetensors"), "--stages", "project,tune", "--tune", "shared", "--perceptual", "none",
                "--project-l2", "1", "--project-steps", "3", "--tune-steps", "60", "--tune-lr", "3e-3",
                "--locality-alpha", "3", "--config", str(opts), "--out", str(out), "--device", "cpu",
                "--precision", "fp32", "--progress", "none"]  # fmt: skip

    ref = subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=1800)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "shared_tune.pt"
    deadline = time.monotonic() + 1800  # only catches a hang
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run must be killed before it ends"
    rounds = load_state(state).rounds
    assert 1 <= rounds < 60 and not list((run / "images").glob("*/done"))
    again = subprocess.run(cmd(run), env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr
    assert "going on after round" in again.stderr and "project" not in again.stderr.split("shared tuning:")[1]
    assert run_outputs(run) == run_outputs(tmp_path / "ref") and not state.exists()


def test_a_run_from_before_shared_tuning_still_resumes_and_shared_is_another_run():
    """config.json written before ``tune_mode`` existed fingerprints as a one-by-one run; how often a shared tuning
    saves its state changes no result; a shared run's fingerprint differs from a one-by-one run's."""
    from cycle_encoding.config import to_dict
    from cycle_encoding.inversion.config import InversionConfig
    from cycle_encoding.inversion.run_folder import fingerprint

    def desc(opts):
        return {"options": opts, "generator": {"weights_sha256": "g"}, "encoder": None, "networks": {}}

    now = to_dict(InversionConfig(stages=("encoder", "tune")))
    old = {k: v for k, v in now.items() if k not in ("tune_mode", "tune_save_every")}
    assert fingerprint(desc(old)) == fingerprint(desc(now)) == fingerprint(desc({**now, "tune_save_every": 3}))
    assert fingerprint(desc({**now, "tune_mode": "shared"})) != fingerprint(desc(now))
    with pytest.raises(ValueError, match="tune_mode must be one of each, shared"):
        InversionConfig(tune_mode="multi")
    with pytest.raises(ValueError, match="tune_batch does not apply to shared tuning"):
        InversionConfig(tune_mode="shared", tune_batch=2)
