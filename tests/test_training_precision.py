"""The ``precision`` option of the two trainers (train-encoder, train-generator).

- ``fp32`` (the default) computes exactly as before the option existed: no autocast context is entered and no
  bfloat16 tensor is ever made (watched op by op), and a run with ``precision="fp32"`` equals one without it;
- ``bf16`` does run in bfloat16 (watched op by op), keeps float32 weights and optimizer state, its loss falls, its
  checkpoint resumes to the uninterrupted bf16 run bit for bit, and config.json, the log and the resolved options
  say which precision ran; a resumed run keeps its precision (a run from before the option stays fp32).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cycle_encoding.cli import main
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.losses.perceptual import register_perceptual, unregister_perceptual
from cycle_encoding.training.encoder_trainer import EncoderTrainer, resume_config
from cycle_encoding.training.generator_trainer import GeneratorTrainer, resume_generator_config
from tests.conftest import stand_in_perceptual
from tests.test_encoder_training import config as enc_config
from tests.test_encoder_training import losses as enc_losses
from tests.test_encoder_training import setup  # noqa: F401 (the fixture)
from tests.test_generator_training import (
    LOSS_KEYS,
    data_root,  # noqa: F401 (the fixture)
    train_records,
)
from tests.test_generator_training import config as gen_config

STANDIN = "stand-in-precision"


# these networks are tiny: a second intra-op thread only adds waiting (7x slower on 2 busy cores)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def standin_perceptual():
    """A registered perceptual distance (a small fixed conv net), so that the loss networks run under autocast too."""
    register_perceptual(STANDIN, lambda device, weights: stand_in_perceptual().to(device), "tests", replace=True)
    yield STANDIN
    unregister_perceptual(STANDIN)


class DtypeWatch(TorchDispatchMode):
    """Counts the ops that produced a bfloat16 tensor, and whether any op ran with CPU autocast on."""

    def __init__(self) -> None:
        super().__init__()
        self.bf16_ops = 0
        self.autocast_seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.autocast_seen |= torch.is_autocast_enabled("cpu")
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.bf16_ops += sum(isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 for o in outs)
        return out


def enc_cfg(root, perceptual, **kw):
    return enc_config(root, perceptual=perceptual, r1_every=2, **kw)


def run_encoder(cfg, watch: DtypeWatch | None = None) -> EncoderTrainer:
    t = EncoderTrainer(cfg, quiet=True)
    if watch is None:
        t.run()
    else:
        with watch:
            t.run()
    t.close()
    return t


def test_encoder_fp32_is_the_computation_without_the_option(setup, standin_perceptual):  # noqa: F811
    kw = dict(max_steps=6, noise_mode="random")
    plain = run_encoder(enc_cfg(setup, standin_perceptual, name="plain", **kw))
    watch = DtypeWatch()
    fp32 = run_encoder(enc_cfg(setup, standin_perceptual, name="fp32", precision="fp32", **kw), watch)
    assert watch.bf16_ops == 0 and not watch.autocast_seen  # float32 only, no autocast context at all
    assert enc_losses(fp32.run_dir) == enc_losses(plain.run_dir)
    assert fp32.weights_digest() == plain.weights_digest()
    cfg = json.loads((fp32.run_dir / "config.json").read_text())
    assert cfg["precision"] == "fp32" and cfg["_resolved"]["precision"].startswith("float32")
    bf = DtypeWatch()  # the watch sees bf16 when it is there
    run_encoder(enc_cfg(setup, standin_perceptual, name="bf", precision="bf16", max_steps=1), bf)
    assert bf.bf16_ops > 50 and bf.autocast_seen


def test_encoder_bf16_learns_with_float32_state(setup, standin_perceptual):  # noqa: F811
    runs = {}
    for prec in ("fp32", "bf16"):
        t = EncoderTrainer(enc_cfg(setup, standin_perceptual, name=prec, precision=prec, lr=2e-3, max_steps=30),
                           quiet=True)  # fmt: skip
        before = t.validate()
        t.run()
        runs[prec] = (before, t.validate(), t)
        t.close()
    (b0, b1, t), (f0, f1, _) = runs["bf16"], runs["fp32"]
    assert b0 == f0  # validation is float32 in both: the same encoder scores the same
    assert b1["l2"] < 0.9 * b0["l2"] and b1["weighted"] < 0.92 * b0["weighted"]  # bf16 learns
    assert abs(b1["weighted"] - f1["weighted"]) < 0.25 * (f0["weighted"] - f1["weighted"])  # about as far as fp32
    assert all(p.dtype == torch.float32 for p in (*t.E.parameters(), *t.D.parameters()))
    for opt in (t.opt_e, t.opt_d):
        assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
                   and v.is_floating_point())  # fmt: skip
    recs = [json.loads(line) for line in (t.run_dir / "log.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "start" and recs[0]["precision"] == "bf16"
    cfg = json.loads((t.run_dir / "config.json").read_text())
    assert cfg["precision"] == "bf16" and "bfloat16" in cfg["_resolved"]["precision"]


def test_encoder_bf16_resume_repeats_the_uninterrupted_run(setup, standin_perceptual):  # noqa: F811
    kw = dict(precision="bf16", max_steps=7, checkpoint_every=3, noise_mode="random")
    full = run_encoder(enc_cfg(setup, standin_perceptual, name="full", **kw))
    part = EncoderTrainer(enc_cfg(setup, standin_perceptual, name="part", **kw), quiet=True)
    part.run(until=3)
    part.close()
    cfg = resume_config(part.run_dir)
    assert cfg.precision == "bf16"  # the run's own precision, from its config.json
    resumed = EncoderTrainer(cfg, resume=part.run_dir, quiet=True)
    resumed.run()
    resumed.close()
    assert enc_losses(part.run_dir) == enc_losses(full.run_dir)  # identical, not close
    assert resumed.weights_digest() == full.weights_digest()


def test_a_run_from_before_the_option_resumes_in_fp32_and_precision_cannot_change(setup, tmp_path):  # noqa: F811
    t = EncoderTrainer(enc_config(setup, out=str(tmp_path), max_steps=2), quiet=True)
    t.run()
    t.close()
    p = t.run_dir / "config.json"
    old = json.loads(p.read_text())
    del old["precision"]
    p.write_text(json.dumps(old))
    assert resume_config(t.run_dir).precision == "fp32"
    with pytest.raises(CycleEncodingError, match="--precision cannot change when resuming"):
        resume_config(t.run_dir, {"precision": "bf16"})


def test_cli_precision_option(setup, tmp_path, capsys):  # noqa: F811
    args = ["train-encoder", "--generator", str(setup / "g.safetensors"), "--data", str(setup / "data"),
            "--preset", "w", "--total-steps", "100", "--max-steps", "2", "--perceptual", "none", "--encoder-widths",
            "8,16,16,32", "--encoder-units", "1,1,1,1", "--w-only", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "e"), "--precision", "bf16"]) == 0
    run = next((tmp_path / "e").iterdir())
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--precision", "fp16"]) == 2
    assert "precision" in capsys.readouterr().err
    assert main(["train-encoder", "--resume", str(run), "--precision", "fp32"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err


# -- the generator trainer ---------------------------------------------------------------------------------------
GEN_KW = dict(max_steps=6, r1_every=2, pl_weight=2.0, pl_every=3, checkpoint_every=3)


def test_generator_fp32_is_the_computation_without_the_option(data_root, tmp_path):  # noqa: F811
    plain = GeneratorTrainer(gen_config(data_root, tmp_path, name="plain", **GEN_KW), quiet=True)
    plain.run()
    plain.close()
    fp32 = GeneratorTrainer(gen_config(data_root, tmp_path, name="fp32", precision="fp32", **GEN_KW), quiet=True)
    watch = DtypeWatch()
    with watch:
        fp32.run()
    fp32.close()
    assert watch.bf16_ops == 0 and not watch.autocast_seen
    assert train_records(fp32.run_dir).keys() == train_records(plain.run_dir).keys()
    for s, r in train_records(plain.run_dir).items():
        assert all(train_records(fp32.run_dir)[s].get(k) == r.get(k) for k in LOSS_KEYS), s
    assert fp32.weights_digest() == plain.weights_digest()


def test_generator_bf16_runs_learns_records_and_resumes_exactly(data_root, tmp_path):  # noqa: F811
    full = GeneratorTrainer(gen_config(data_root, tmp_path, name="full", precision="bf16", **GEN_KW), quiet=True)
    watch = DtypeWatch()
    with watch:
        full.run()
    full.close()
    assert watch.bf16_ops > 100 and watch.autocast_seen
    assert all(p.dtype == torch.float32 for m in (full.G, full.D, full.g_ema) for p in m.parameters())
    ref = train_records(full.run_dir)
    assert all(k in r for r in ref.values() for k in ("d_loss", "g_loss"))
    assert any("r1" in r for r in ref.values()) and any("path_penalty" in r for r in ref.values())
    recs = [json.loads(line) for line in (full.run_dir / "log.jsonl").read_text().splitlines()]
    assert recs[0]["precision"] == "bf16"
    cfg = json.loads((full.run_dir / "config.json").read_text())
    assert cfg["precision"] == "bf16" and "bfloat16" in cfg["_resolved"]["precision"]

    part = GeneratorTrainer(gen_config(data_root, tmp_path, name="part", precision="bf16", **GEN_KW), quiet=True)
    part.run(until=3)
    part.close()
    cfg = resume_generator_config(part.run_dir)
    assert cfg.precision == "bf16"
    resumed = GeneratorTrainer(cfg, resume=part.run_dir, quiet=True)
    resumed.run()
    resumed.close()
    got = train_records(part.run_dir)
    for s in range(1, 7):
        assert all(got[s].get(k) == ref[s].get(k) for k in LOSS_KEYS), s  # identical, not close
    assert resumed.weights_digest() == full.weights_digest()


def test_generator_bf16_moves_the_discriminator_like_fp32(data_root, tmp_path):  # noqa: F811
    """Same seeds, 12 steps: bf16's losses track fp32's (the first step's D loss within bf16 rounding), and D learns
    to score reals above fakes in both."""
    out = {}
    for prec in ("fp32", "bf16"):
        t = GeneratorTrainer(gen_config(data_root, tmp_path, name=prec, precision=prec, max_steps=12), quiet=True)
        t.run()
        t.close()
        out[prec] = train_records(t.run_dir)
    a, b = out["fp32"], out["bf16"]
    assert b[1]["d_loss"] != a[1]["d_loss"] and b[1]["d_loss"] == pytest.approx(a[1]["d_loss"], rel=0.02)
    for r in (a, b):
        late = [r[s]["real_score"] - r[s]["fake_score"] for s in range(9, 13)]
        assert sum(late) / len(late) > 0


# -- --compile ----------------------------------------------------------------------------------------------------
def test_compile_without_a_cxx_compiler_is_one_clear_line(data_root, tmp_path):  # noqa: F811
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler-here")}):
        with pytest.raises(CycleEncodingError, match="needs a C\\+\\+ compiler"):
            GeneratorTrainer(gen_config(data_root, tmp_path, compile=True), quiet=True)


@pytest.mark.slow
def test_compiled_generator_training_tracks_plain_and_resumes_exactly(data_root, tmp_path):  # noqa: F811
    """torch.compile'd G and D passes: the losses follow the plain bf16 run's within rounding, the regularizers (no
    double backward through a compiled graph) still run, and a resumed run equals the uninterrupted one bit for bit."""
    kw = dict(GEN_KW, precision="bf16", max_steps=5, pl_every=2)
    plain = GeneratorTrainer(gen_config(data_root, tmp_path, name="plain", **kw), quiet=True)
    plain.run()
    plain.close()
    full = GeneratorTrainer(gen_config(data_root, tmp_path, name="full", compile=True, **kw), quiet=True)
    full.run()
    full.close()
    ref, base = train_records(full.run_dir), train_records(plain.run_dir)
    assert ref[1]["d_loss"] == pytest.approx(base[1]["d_loss"], rel=0.02)
    assert any("r1" in r for r in ref.values()) and any("path_penalty" in r for r in ref.values())
    assert json.loads((full.run_dir / "config.json").read_text())["compile"] is True
    part = GeneratorTrainer(gen_config(data_root, tmp_path, name="part", compile=True, **kw), quiet=True)
    part.run(until=3)
    part.close()
    cfg = resume_generator_config(part.run_dir)
    assert cfg.compile and cfg.precision == "bf16"
    resumed = GeneratorTrainer(cfg, resume=part.run_dir, quiet=True)
    resumed.run()
    resumed.close()
    got = train_records(part.run_dir)
    assert all(got[s].get(k) == ref[s].get(k) for s in range(1, 6) for k in LOSS_KEYS)
    assert resumed.weights_digest() == full.weights_digest()
