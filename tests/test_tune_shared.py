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
