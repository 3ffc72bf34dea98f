"""Pivotal tuning of several images at once (``pivotal_tune_many``) against ``pivotal_tune`` on each image alone:

- the stacked renderer equals G's own rendering of each image's weights (within float rounding: grouped
  convolutions over several images sum in another order);
- one Adam over stacked weights is each row's own Adam, bit for bit (for-loop and fused);
- fp32: each image's step losses, number of updates and early stop equal tuning it alone, and its tuned weights
  equal them within what Adam makes of float rounding (``assert_tuned_alike``: the analysis), for three images of
  which two stop early at different steps, also with the regularizer's random noise, which each image draws from its
  own seeded generator;
- bf16: the batched images stay as close to the images tuned alone in bf16 as bf16 itself is to fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cycle_encoding.inversion import TuneConfig, pivotal_tune
from cycle_encoding.inversion.common import LossNetworks
from cycle_encoding.inversion.tune_batch import pivotal_tune_many, stack_parameters, stacked_synthesis
from tests.conftest import make_tiny_generator, own_images, stand_in_perceptual

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = [10, 11, 12]


@pytest.fixture(scope="module")
def tiny():
    G = make_tiny_generator(resolution=16)
    xs = own_images(G, 3, seed=7)
    with torch.no_grad():
        piv = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(5)), truncation=0.7)
    return {"G": G, "P": stand_in_perceptual(), "pivots": list(piv[:, None]), "targets": list(xs[:, None])}


def change_distance(a: torch.nn.Module, b: torch.nn.Module, base: torch.nn.Module) -> float:
    """||a - b|| over all weights, relative to how far ``a`` moved from ``base``."""
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    num = sum(float((sa[k] - sb[k]).square().sum()) for k in s0)
    den = sum(float((sa[k] - s0[k]).square().sum()) for k in s0)
    return (num / den) ** 0.5


def adam_ceiling(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The most Adam can move one element in ``steps`` updates, in units of lr: the sum over t of the largest
    |m_hat / sqrt(v_hat)| (Cauchy-Schwarz on m_t's weighted sum of gradients against v_t's), whatever the gradients."""
    r = beta1**2 / beta2
    return sum(
        (1 - beta1) / (1 - beta1**t) * ((1 - beta2**t) / (1 - beta2)) ** 0.5 * ((1 - r**t) / (1 - r)) ** 0.5
        for t in range(1, steps + 1)
    )


def assert_tuned_alike(a: dict, b: dict, base: dict, lr: float, updates: int) -> None:
    """Weights ``a`` and ``b`` (state dicts) of one image tuned from ``base`` in two ways whose gradients differ only
    by float rounding (batched and alone: other summation orders).

    Why not elementwise allclose: Adam's step is lr * m_hat / (sqrt(v_hat) + eps), and its first is
    lr * g / (|g| + eps), eps = 1e-8, a function of g with slope up to 1/eps. A gradient element is a float32 sum
    whose rounding error delta is ~1e-6 of the tensor's gradient scale (~1e-3 here: delta ~ 1e-9, measured); where
    the exact gradient is within ~1e-7 of zero, that error changes the step by up to lr * delta * eps / (|g| + eps)^2,
    ~lr / 10, and the step stays in the weight (later steps, with v_hat built from larger gradients, are
    insensitive). So a few elements, those whose gradient happened to be near zero, differ by up to Adam's ceiling
    (``adam_ceiling``), whichever CPU, and which elements and by how much depends on the CPU's summation order.
    What the arithmetic does bound:

    - how many such elements: those with |g| below ~sqrt(lr * delta * eps / 1e-6) ~ 2e-7, a fraction
      2e-7 * p(0) ~ 3e-4 of all (p(0) ~ 1e3, the gradients' density at zero, measured: 0.03% under 1e-7); at most
      1% may differ beyond atol 1e-6 + rtol 1e-4 (a rounding error 1000x larger would still pass, a wrong batching
      moves most elements);
    - how far: none beyond 2 * lr * ``adam_ceiling(updates)`` (the two runs' largest moves in opposite ways);
    - the distance over all weights relative to the tuning's change: summing the first step's error over the
      elements near zero gives sqrt(p(0) * (2/3) * delta^2 / eps) / updates ~ 4e-5 (measured 3e-6 to 3e-5); the
      bound 1e-3 leaves 25x for a worse rounding, and a wrong batching (another image's seed, target or step) gives
      a distance of order 0.1 to 1.
    """
    total = sum(v.numel() for v in base.values())
    off = sum(int((~torch.isclose(b[k], a[k], rtol=1e-4, atol=1e-6)).sum()) for k in base)
    assert off <= 0.01 * total, f"{off} of {total} weights differ beyond float rounding"
    ceiling = 2 * lr * adam_ceiling(updates)
    worst = max(float((a[k] - b[k]).abs().max()) for k in base)
    assert worst <= ceiling, f"a weight differs by {worst:.3g}, more than Adam's {updates} steps can move it"
    num = sum(float((a[k] - b[k]).square().sum()) for k in base)
    den = sum(float((a[k] - base[k]).square().sum()) for k in base)
    assert (num / den) ** 0.5 < 1e-3, f"weights apart by {(num / den) ** 0.5:.3g} of their change"


def test_stacked_synthesis_renders_each_images_own_weights(tiny):
    G = tiny["G"]
    P = stack_parameters(G, 3)
    copies = []
    with torch.no_grad():
        for i in range(3):  # every image's weights made different
            for k in P:
                P[k][i] += 0.05 * (i + 1) * torch.randn(P[k].shape[1:], generator=torch.Generator().manual_seed(i))
            Gi = copy.deepcopy(G)
            for k, p in Gi.named_parameters():
                if k in P:
                    p.copy_(P[k][i])
            copies.append(Gi)
        ws = torch.stack([torch.cat([tiny["pivots"][i], tiny["pivots"][(i + 1) % 3]]) for i in range(3)])  # b = 2
        for mode in ("const", "none"):
            noise = None if mode == "const" else [None] * G.config.num_noises
            y = stacked_synthesis(G, P, ws, noise)
            for i in range(3):
                ref = copies[i].synthesis(ws[i], noise_mode=mode)
                assert torch.allclose(y[i], ref, rtol=1e-5, atol=1e-5), (mode, i)


@pytest.mark.parametrize("fused", [False, True])
def test_one_adam_over_stacked_weights_is_each_rows_own_adam(fused):
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(7, 5, generator=gen) for _ in range(3)]
    apart = [r.clone().requires_grad_(True) for r in rows]
    stacked = torch.stack(rows).requires_grad_(True)
    kw = {"fused": True} if fused else {}
    opts = [torch.optim.Adam([p], lr=1e-2, **kw) for p in apart]
    opt = torch.optim.Adam([stacked], lr=1e-2, **kw)
    for _ in range(4):
        grads = [torch.randn(7, 5, generator=gen) for _ in range(3)]
        for p, o, g in zip(apart, opts, grads):
            p.grad = g.clone()
            o.step()
        stacked.grad = torch.stack(grads)
        opt.step()
    assert all(torch.equal(stacked[i], apart[i]) for i in range(3))


def _threshold_stopping_at(losses: list[dict], step: int) -> float:
    """A stop threshold that ``losses`` (a run without early stop) first meets at ``step``, far from the values."""
    p = [r["perceptual"] for r in losses]
    above = min(p[:step])
    assert p[step] < above, "the perceptual distance must fall to a new low at that step"
    return (p[step] + above) / 2


def _tune_alone(tiny, cfg: TuneConfig) -> list:
    return [
        pivotal_tune(tiny["G"], tiny["pivots"][i], tiny["targets"][i], LossNetworks(tiny["P"]), cfg, seed=SEEDS[i])
        for i in range(3)
    ]


@pytest.mark.parametrize("batch_passes,noise", [(False, "none"), (True, "random")])
def test_fp32_batched_tuning_equals_each_image_alone_with_early_stops(tiny, batch_passes, noise):
    G = tiny["G"]
    base = TuneConfig(steps=8, lr=3e-3, locality_alpha=3.0, stop_threshold=None, batch_passes=batch_passes,
                      locality_noise_mode=noise)  # fmt: skip
    free = _tune_alone(tiny, base)
    # a threshold that image 0 meets at step 4; image 1 meets it later, image 2 not within the steps
    cfg = TuneConfig(**{**base.__dict__, "stop_threshold": _threshold_stopping_at(free[0].losses, 4)})
    alone = _tune_alone(tiny, cfg)
    seen: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    many = pivotal_tune_many(G, tiny["pivots"], tiny["targets"], LossNetworks(tiny["P"]), cfg, SEEDS,
                             on_step=lambda i, r: seen[i].append(r))  # fmt: skip
    assert [a.stopped_early for a in alone] == [True, True, False]
    assert alone[0].updates == 4 < alone[1].updates < alone[2].updates == 8
    for i, (a, b) in enumerate(zip(alone, many, strict=True)):
        assert (b.updates, b.stopped_early) == (a.updates, a.stopped_early), i
        assert seen[i] == b.losses
        assert len(b.losses) == len(a.losses)
        for ra, rb in zip(a.losses, b.losses):
            assert set(ra) == set(rb)
            for k in ("l2", "perceptual", "locality", "loss"):
                if k in ra:
                    assert rb[k] == pytest.approx(ra[k], rel=2e-5, abs=1e-7), (i, ra["step"], k)
        assert_tuned_alike(a.generator.state_dict(), b.generator.state_dict(), G.state_dict(), cfg.lr, a.updates)
        assert not b.generator.training and not any(p.requires_grad for p in b.generator.parameters())


def test_bf16_batched_tuning_stays_within_bf16s_own_distance(tiny):
    G = tiny["G"]
    cfg = TuneConfig(steps=8, lr=3e-3, locality_alpha=3.0, stop_threshold=None, precision="bf16")
    fp32 = _tune_alone(tiny, TuneConfig(**{**cfg.__dict__, "precision": "fp32"}))
    alone = _tune_alone(tiny, cfg)
    many = pivotal_tune_many(G, tiny["pivots"], tiny["targets"], LossNetworks(tiny["P"]), cfg, SEEDS)
    for r, a, b in zip(fp32, alone, many, strict=True):
        own = change_distance(r.generator, a.generator, G)  # bf16 alone against fp32 alone
        assert change_distance(a.generator, b.generator, G) < 2 * own + 1e-3
        assert change_distance(r.generator, b.generator, G) < 2 * own + 1e-3
        assert all(p.dtype == torch.float32 for p in b.generator.parameters())
        assert b.updates == a.updates == 8
        for ra, rb in zip(a.losses, b.losses, strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=0.05)


def test_bad_input_is_refused_in_one_line(tiny):
    with pytest.raises(ValueError, match="2 pivots but 1 targets"):
        pivotal_tune_many(tiny["G"], tiny["pivots"][:2], tiny["targets"][:1])
    assert pivotal_tune_many(tiny["G"], [], []) == []


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A generator file, an encoder file, a folder of 5 targets and one unreadable image, a stand-in perceptual."""
    import cycle_encoding as ce
    from cycle_encoding.checkpoints.native import default_provenance
    from cycle_encoding.losses.perceptual import register_perceptual, unregister_perceptual
    from cycle_encoding.utils import save_image
    from tests.conftest import tiny_encoder

    root = tmp_path_factory.mktemp("tb")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "g.safetensors")
    E = tiny_encoder(G)
    ce.save_encoder(E, root / "e.safetensors", provenance=default_provenance(), trained_stage=0)
    targets = root / "targets"
    for i, im in enumerate(own_images(G, 5, seed=9)):
        save_image(im, targets / f"img{i}.png")
    (targets / "img5.png").write_bytes(b"not a png")
    register_perceptual("test-tune-batch-stand-in", lambda d, w: stand_in_perceptual().to(d), "tests", replace=True)
    yield root
    unregister_perceptual("test-tune-batch-stand-in")


def test_invert_with_tune_batch_gives_each_image_its_one_by_one_results(run_files, tmp_path, capsys):
    """``invert --tune-batch 3`` over 5 images (+1 unreadable): batches of 3 and 2 (the unreadable one fails alone);
    every image's files equal the one-by-one run's, and the run's config.json records the batch. Pivots bit for bit;
    updates and early stops exactly; step losses and final metrics within rel 1e-4: float sums that differ by their
    summation order (~1e-6 relative) and, to first order, not by the weights Adam amplified that rounding in (their
    gradients were ~0, so the losses hardly depend on them); the tuned weights as ``assert_tuned_alike`` analyses
    (elementwise atol 1e-6 failed on an AVX2-only CPU: 2e-5, one element in 55,502)."""
    import json

    from cycle_encoding import load_generator
    from cycle_encoding.checkpoints.native import read_native
    from cycle_encoding.cli import main
    from cycle_encoding.inversion import load_generator_delta

    def invert(out, *extra):
        return main(["invert", str(run_files / "targets"), "--generator", str(run_files / "g.safetensors"),
                     "--encoder", str(run_files / "e.safetensors"), "--stages", "encoder,tune", "--perceptual",
                     "test-tune-batch-stand-in", "--identity", "none", "--tune-steps", "6", "--tune-lr", "3e-3",
                     "--locality-alpha", "3", "--stop-threshold", "0.3", "--out", str(out), "--device", "cpu",
                     "--progress", "lines", "--precision", "fp32", *extra])  # fmt: skip

    assert invert(tmp_path / "one", "--tune-batch", "1") == 3  # the unreadable image fails
    capsys.readouterr()
    assert invert(tmp_path / "batch", "--tune-batch", "3") == 3
    err = capsys.readouterr().err
    assert "tuned in a batch of 3" in err and "tuned in a batch of 2" in err and "img5: FAILED" in err
    assert "(3 images) tune: step 1/6" in err  # the batch's progress
    cfg = json.loads((tmp_path / "batch" / "config.json").read_text())
    assert cfg["options"]["tune_batch"] == 3
    assert json.loads((tmp_path / "one" / "config.json").read_text())["options"]["tune_batch"] == 1
    stops, base = [], load_generator(run_files / "g.safetensors").state_dict()
    for i in range(5):
        a, b = (tmp_path / r / "images" / f"img{i}" for r in ("one", "batch"))
        ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
        assert rb["tune"].pop("batch") == (3 if i < 3 else 2)
        assert ra["tune"] == rb["tune"]
        stops.append(ra["tune"]["stopped_early"])
        for k, v in ra["metrics"]["tune"].items():
            assert rb["metrics"]["tune"][k] == pytest.approx(v, rel=1e-4), (i, k)
        assert ra["metrics"]["encoder"] == rb["metrics"]["encoder"]
        pa, pb = (read_native(d / "pivots.safetensors").tensors for d in (a, b))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
        ga, gb = (load_generator_delta(d / "generator_delta.safetensors", run_files / "g.safetensors") for d in (a, b))
        assert_tuned_alike(ga.state_dict(), gb.state_dict(), base, 3e-3, ra["tune"]["updates"])
        la, lb = ([json.loads(s) for s in (d / "losses.jsonl").read_text().splitlines()] for d in (a, b))
        assert [r["step"] for r in la] == [r["step"] for r in lb]
        assert all(y["loss"] == pytest.approx(x["loss"], rel=1e-4) for x, y in zip(la, lb) if "loss" in x)
    assert any(stops) and not all(stops), "fixture: some images must stop early, others not"


@pytest.mark.parametrize("many", [False, True])
def test_locality_every_k_regularizes_only_every_kth_step(tiny, many):
    """``locality_every=3``: the regularizer's term on steps 0, 3 and 6 only (one by one and batched), the first
    step equal to the every-step run's, and the other steps' losses without the term."""
    cfgs = {k: TuneConfig(steps=7, lr=3e-3, locality_alpha=3.0, stop_threshold=None, locality_every=k) for k in (1, 3)}
    if many:
        runs = {k: pivotal_tune_many(tiny["G"], tiny["pivots"][:2], tiny["targets"][:2], LossNetworks(tiny["P"]), c,
                                     SEEDS[:2])[0] for k, c in cfgs.items()}  # fmt: skip
    else:
        runs = {k: _tune_alone(tiny, c)[0] for k, c in cfgs.items()}
    every, third = runs[1].losses, runs[3].losses
    assert [r["step"] for r in every if "locality" in r] == list(range(7))
    assert [r["step"] for r in third if "locality" in r] == [0, 3, 6]
    assert third[0]["loss"] == pytest.approx(every[0]["loss"], rel=1e-6)
    for r in third:
        with_term = (
            r["l2"] * TuneConfig().l2_lambda
            + r.get("perceptual", 0.0) * TuneConfig().perceptual_lambda
            + r.get("locality", 0.0)
        )
        assert r["loss"] == pytest.approx(with_term, rel=1e-5)
    assert runs[3].updates == 7
