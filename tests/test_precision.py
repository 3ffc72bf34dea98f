"""The ``precision`` option of pivotal tuning and the refinement, and the speed levers beside it.

- ``fp32`` (the default) stays the authors' loop exactly: the tuning's losses and weights equal, bit for bit, a plain
  re-implementation of PTI's step written here from the formulas (for-loop Adam, no autocast);
- ``bf16`` runs the networks under bfloat16 autocast with float32 weights: its losses stay within a few percent of
  the fp32 ones, fall the same way, and the tuned weights are float32;
- the separable blur equals the 2-D depthwise one within float rounding, values and gradients;
- ``keep_freed_memory`` sets glibc's malloc (where the C library is glibc).
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch
import torch.nn.functional as F

from cycle_encoding.data.datasets import TensorDataset
from cycle_encoding.inversion import RefineConfig, RegularizedRefiner, TuneConfig, encoder_pivot, pivotal_tune
from cycle_encoding.inversion.common import LossNetworks, cpu_generator
from cycle_encoding.ops import autocast, keep_freed_memory
from tests.conftest import make_tiny_generator, own_images, stand_in_perceptual, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    G = make_tiny_generator(resolution=16)
    E = tiny_encoder(G)
    x = own_images(G, 1, seed=7)
    return {"G": G, "E": E, "x": x, "P": stand_in_perceptual(), "pivot": encoder_pivot(E, x)}


def reference_tune(G, pivot, x, P, steps: int, lr: float, seed: int, alpha: float):
    """PTI's step as the module doc states it, written independently: loss = MSE + P on the pivot, plus
    0.1 MSE + 0.1 P between the original and the tuned G at a code ``alpha`` toward a mapped random code."""
    tuned = copy.deepcopy(G).requires_grad_(True)
    G = copy.deepcopy(G).requires_grad_(False)
    opt = torch.optim.Adam(list(tuned.parameters()), lr=lr, betas=(0.9, 0.999))
    gen = cpu_generator(seed)
    losses = []
    for _ in range(steps):
        y = tuned.synthesis(pivot, noise_mode="const")
        loss = F.mse_loss(y, x) + P(y, x).mean()
        z = torch.randn(1, G.z_dim, generator=gen)
        with torch.no_grad():
            wz = G.mapping(z, truncation=0.5)
            d = wz - pivot
            wr = pivot + alpha * d / d.flatten(1).norm(dim=1).view(-1, 1, 1)
            old = G.synthesis(wr, noise_mode="none")
        new = tuned.synthesis(wr, noise_mode="none")
        loss = loss + (0.1 * F.mse_loss(new, old) + 0.1 * P(new, old).mean())
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuned, losses


def test_fp32_tuning_is_the_reference_loop_bit_for_bit(tiny):
    G, x, P, pivot = tiny["G"], tiny["x"], tiny["P"], tiny["pivot"]
    ref, ref_losses = reference_tune(G, pivot, x, P, steps=4, lr=3e-3, seed=3, alpha=3.0)
    for cfg in (
        TuneConfig(steps=4, lr=3e-3, stop_threshold=None, locality_alpha=3.0),  # the option absent: default
        TuneConfig(steps=4, lr=3e-3, stop_threshold=None, locality_alpha=3.0, precision="fp32"),
    ):
        r = pivotal_tune(G, pivot, x, LossNetworks(P), cfg, seed=3)
        assert [rec["loss"] for rec in r.losses] == ref_losses
        got = r.generator.state_dict()
        assert all(torch.equal(v, got[k]) for k, v in ref.state_dict().items())


def test_bf16_tuning_tracks_fp32_with_float32_weights(tiny):
    G, x, P, pivot = tiny["G"], tiny["x"], tiny["P"], tiny["pivot"]
    runs = {}
    for prec in ("fp32", "bf16"):
        cfg = TuneConfig(steps=30, lr=3e-3, stop_threshold=None, locality_alpha=3.0, precision=prec)
        runs[prec] = pivotal_tune(G, pivot, x, LossNetworks(P), cfg, seed=0)
    a, b = runs["fp32"].losses, runs["bf16"].losses
    assert abs(b[0]["loss"] - a[0]["loss"]) < 0.03 * a[0]["loss"]  # same start within bf16 rounding
    assert b[0]["loss"] != a[0]["loss"]  # and bf16 did run
    assert b[-1]["l2"] < 0.5 * b[0]["l2"]  # it learns
    assert abs(b[-1]["l2"] - a[-1]["l2"]) < 0.25 * a[-1]["l2"] + 1e-4  # about as far as fp32
    assert all(p.dtype == torch.float32 for p in runs["bf16"].generator.parameters())


def test_bf16_refinement_gives_a_float32_pivot_near_the_fp32_one(tiny):
    G, E, x, P = tiny["G"], tiny["E"], tiny["x"], tiny["P"]
    data = TensorDataset(own_images(G, 16, seed=1), name="own images")
    out = {}
    for prec in ("fp32", "bf16"):
        refiner = RegularizedRefiner(G, E, data, RefineConfig(steps=4, num_random=3, lr=1e-3, precision=prec, noise_mode="const"),
                                     LossNetworks(P), image_size=16)  # fmt: skip
        out[prec] = refiner.refine(x, seed=0)
    a, b = out["fp32"], out["bf16"]
    assert b.pivot.dtype == torch.float32
    assert abs(b.first_target_loss - a.first_target_loss) < 0.03 * a.first_target_loss
    assert float((b.pivot - a.pivot).norm() / a.pivot.norm()) < 0.02
    assert abs(b.target_loss - a.target_loss) < 0.05 * a.target_loss


def test_compiled_refinement_equals_the_plain_one_and_compiles_once(tiny):
    """refine.compile: the encoder's body and G's synthesis through torch.compile give the plain loop's pivots and
    losses within float rounding, target after target (the weights are reset in place: no recompiling), with the
    random noise of the authors' run."""
    from torch._dynamo.utils import counters

    G, E, P = tiny["G"], tiny["E"], tiny["P"]
    data = TensorDataset(own_images(G, 16, seed=1), name="own images")
    xs = own_images(G, 2, seed=9)
    out = {}
    for comp in (False, True):
        refiner = RegularizedRefiner(G, E, data, RefineConfig(steps=4, num_random=3, lr=1e-3, compile=comp),
                                     LossNetworks(P), image_size=16)  # fmt: skip
        graphs = []
        out[comp] = []
        for i in range(2):
            out[comp].append(refiner.refine(xs[i : i + 1], seed=i))
            graphs.append(counters["stats"]["unique_graphs"])
        if comp:
            assert graphs[0] > 0 and graphs[1] == graphs[0]  # the second target reuses the first one's graphs
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a.pivot, b.pivot, rtol=1e-4, atol=1e-5)
        la, lb = [r["loss"] for r in a.losses], [r["loss"] for r in b.losses]
        assert la == pytest.approx(lb, rel=1e-4)
    assert not torch.allclose(out[True][0].pivot, out[True][1].pivot)  # two targets, two pivots


def test_compiled_tuning_equals_the_plain_one_and_compiles_once(tiny):
    """tune.compile: the generators' renders through torch.compile give the plain loop's losses and weights within
    float rounding, with and without batch_passes; a second image's new copy of G reuses the graphs."""
    from torch._dynamo.utils import counters

    G, E, P = tiny["G"], tiny["E"], tiny["P"]
    xs = own_images(G, 2, seed=11)
    for passes in (False, True):
        runs: dict[bool, list] = {}
        for comp in (False, True):
            cfg = TuneConfig(steps=4, lr=3e-3, stop_threshold=None, locality_alpha=3.0, batch_passes=passes,
                             compile=comp)  # fmt: skip
            runs[comp] = []
            for i in range(2):
                x = xs[i : i + 1]
                runs[comp].append(pivotal_tune(G, encoder_pivot(E, x), x, LossNetworks(P), cfg, seed=i))
                if comp and i == 0:
                    graphs = counters["stats"]["unique_graphs"]
            if comp:
                assert counters["stats"]["unique_graphs"] == graphs  # the second image compiled nothing new
        for a, b in zip(runs[False], runs[True]):
            assert [r["loss"] for r in a.losses] == pytest.approx([r["loss"] for r in b.losses], rel=1e-4)
            wa, wb = a.generator.state_dict(), b.generator.state_dict()
            assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa)
            assert a.losses[-1]["l2"] < a.losses[0]["l2"]  # it tunes


def test_autocast_fp32_is_no_context_and_bf16_lowers_convolutions():
    w = torch.randn(4, 3, 3, 3)
    x = torch.randn(1, 3, 8, 8)
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert F.conv2d(x, w).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert F.conv2d(x, w).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        with autocast("cpu", "fp16"):
            pass
    with pytest.raises(ValueError, match="precision"):
        TuneConfig(precision="half")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_sets_glibc_malloc():
    assert keep_freed_memory() is True


def test_bf16_encoder_gradients_stay_finite_on_one_pixel_maps(tiny):
    """The tiny encoder's heads see 1x1 maps: torch's bf16 CPU backward of a 3x3 stride-2 convolution there gave NaN
    weight gradients in about one call of four (uninitialized memory); the heads compute that case as the 1x1
    convolution it is."""
    E = tiny_encoder(tiny["G"])
    E.stage = "all"
    E.train().requires_grad_(True)
    x = own_images(tiny["G"], 4, seed=1)
    with torch.no_grad():
        ref = E(x)
    for _ in range(12):
        E.zero_grad()
        junk = [torch.full((1000 + k,), float("nan"), dtype=torch.bfloat16) for k in range(4)]  # dirty the heap
        del junk
        with autocast("cpu", "bf16"):
            ws = E(x).float()
        ws.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in E.parameters() if p.grad is not None)
    assert float((ws.detach() - ref).norm() / ref.norm()) < 0.02


def test_batched_passes_give_the_separate_passes_terms(tiny):
    G, x, P, pivot = tiny["G"], tiny["x"], tiny["P"], tiny["pivot"]
    runs = {}
    for batched in (False, True):
        cfg = TuneConfig(steps=5, lr=3e-3, stop_threshold=None, locality_alpha=3.0, batch_passes=batched)
        runs[batched] = pivotal_tune(G, pivot, x, LossNetworks(P), cfg, seed=2)
    for a, b in zip(runs[False].losses, runs[True].losses, strict=True):
        for k in ("l2", "perceptual", "locality", "loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
    wa, wb = runs[False].generator.state_dict(), runs[True].generator.state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa)


def test_cli_precision_runs_and_is_recorded_in_config_json(tiny, tmp_path, capsys):
    import json

    import cycle_encoding as ce
    from cycle_encoding.cli import main
    from cycle_encoding.utils import save_image

    ce.save_generator(tiny["G"], tmp_path / "g.safetensors")
    ce.save_encoder(tiny["E"], tmp_path / "e.safetensors")
    (tmp_path / "t").mkdir()
    save_image(tiny["x"][0], tmp_path / "t" / "a.png")
    run = tmp_path / "run"
    args = ["invert", str(tmp_path / "t"), "--generator", str(tmp_path / "g.safetensors"), "--encoder",
            str(tmp_path / "e.safetensors"), "--stages", "encoder,tune", "--perceptual", "none", "--tune-steps", "2",
            "--out", str(run), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*args, "--precision", "bf16", "--batch-passes"]) == 0
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["tune"]["precision"] == "bf16" and options["refine"]["precision"] == "bf16"
    assert options["tune"]["batch_passes"] is True
    assert options["refine"]["compile"] is False
    capsys.readouterr()
    assert main([*args[:-5], "--out", str(tmp_path / "r3"), "--compile", "--dry-run"]) == 0
    options = json.loads(capsys.readouterr().out)["options"]
    assert options["refine"]["compile"] is True and options["tune"]["compile"] is True
    assert main([*args[:-5], "--out", str(tmp_path / "r2"), "--precision", "fp16", "--dry-run"]) == 2


# -- --precision auto: bf16 where the device computes it natively --------------------------------------------------
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"


def test_precision_auto_follows_the_cpu_flags():
    from cycle_encoding.ops import cpu_flags, resolve_precision

    assert cpu_flags(X86_PLAIN) == {"fpu", "sse2", "avx2", "avx512f", "avx512bw"}
    assert resolve_precision("auto", "cpu", X86_AVX512_BF16) == ("bf16", "auto: CPU with avx512_bf16")
    assert resolve_precision("auto", "cpu", X86_AMX) == ("bf16", "auto: CPU with amx_bf16")
    assert resolve_precision("auto", "cpu", ARM_BF16) == ("bf16", "auto: CPU with bf16")
    assert resolve_precision("auto", "cpu", X86_PLAIN)[0] == "fp32"  # avx512bw alone: bf16 emulated, slower
    assert resolve_precision("auto", "cpu", "")[0] == "fp32"
    for given in ("fp32", "bf16"):  # an explicit choice is kept whatever the machine
        assert resolve_precision(given, "cpu", X86_PLAIN) == (given, "as given")
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_precision_auto_on_this_machine_matches_proc_cpuinfo():
    from cycle_encoding.ops import resolve_precision

    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    native = any(f in text.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert resolve_precision("auto", "cpu")[0] == ("bf16" if native else "fp32")


def test_cli_precision_defaults_to_auto_and_says_what_it_chose(tiny, tmp_path, capsys):
    import json

    import cycle_encoding as ce
    from cycle_encoding.cli import main
    from cycle_encoding.ops import resolve_precision
    from cycle_encoding.utils import save_image

    expected, why = resolve_precision("auto", "cpu")
    ce.save_generator(tiny["G"], tmp_path / "g.safetensors")
    ce.save_encoder(tiny["E"], tmp_path / "e.safetensors")
    (tmp_path / "t").mkdir()
    save_image(tiny["x"][0], tmp_path / "t" / "a.png")
    args = ["invert", str(tmp_path / "t"), "--generator", str(tmp_path / "g.safetensors"), "--encoder",
            str(tmp_path / "e.safetensors"), "--stages", "encoder,tune", "--perceptual", "none", "--tune-steps", "2",
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert options["tune"]["precision"] == expected and options["refine"]["precision"] == expected
    assert f"tune {expected} ({why})" in capsys.readouterr().err
    # a --config file's choice stands when the command line gives none
    (tmp_path / "c.yaml").write_text("tune: {precision: fp32}\nrefine: {precision: fp32}\n")
    assert main([*args, "--out", str(tmp_path / "run2"), "--config", str(tmp_path / "c.yaml")]) == 0
    options = json.loads((tmp_path / "run2" / "config.json").read_text())["options"]
    assert options["tune"]["precision"] == "fp32" and options["refine"]["precision"] == "fp32"
