"""``train-encoder --dry-run``: open everything a training run will need, before any step, and say what was found.
Design notes: docs/INTERNALS.md, "cycle_encoding.training.preflight"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..checkpoints import load_generator
from ..checkpoints.encoder import init_encoder_weights
from ..data.datasets import open_dataset
from ..errors import CycleEncodingError
from ..losses.networks import build_loss_networks
from ..networks.encoder import Encoder4Editing
from .encoder_trainer import EncoderTrainConfig, data_domain, encoder_config, identity_choice, perceptual_choice
from .schedule import Schedule, get_schedule


@dataclass
class Preflight:
    """What ``check_encoder_run`` opened: the schedule (laid out for ``num_ws``) and one line per thing checked."""

    schedule: Schedule
    num_ws: int
    checked: list[str] = field(default_factory=list)

    def format(self) -> str:
        return "\n".join(
            ["checked (everything the run opens before its first step):", *[f"  {c}" for c in self.checked]]
        )


def check_encoder_run(cfg: EncoderTrainConfig) -> Preflight:
    """Open the generator, the data, the loss networks, the encoder initialisation and the schedule as
    ``EncoderTrainer`` will; raises the run's own one-line error for the first that fails."""
    G = load_generator(cfg.generator, device="cpu")
    checked = [
        f"generator {cfg.generator}: {G.resolution}x{G.resolution}x{G.img_channels}, {G.num_ws} codes of {G.w_dim}"
    ]
    schedule = get_schedule(cfg.preset, cfg.schedule_file, cfg.total_steps)
    schedule.table(G.num_ws)  # a schedule naming stages the generator does not have fails here
    checked.append(f"schedule {schedule.name!r}: {schedule.total_steps} steps, stages laid out for {G.num_ws} codes")
    size = cfg.image_size or min(G.resolution, 256)
    data = open_dataset(cfg.data, size, G.img_channels, "train")
    if len(data) < cfg.batch_size:
        raise CycleEncodingError(f"{cfg.data}: {len(data)} image(s), fewer than the batch size {cfg.batch_size}")
    checked.append(f"data {cfg.data}: {len(data)} images at {size}x{size}")
    if cfg.val_data:
        val: Any = open_dataset(cfg.val_data, size, G.img_channels, "test")
        checked.append(f"validation data {cfg.val_data}: {len(val)} images")
    elif cfg.val_count >= len(data):
        raise CycleEncodingError(f"cannot hold out {cfg.val_count} of {len(data)} images for validation: too few")
    pname, pnote = perceptual_choice(cfg, G.img_channels)  # as EncoderTrainer resolves and builds them
    iname, inote = identity_choice(cfg)
    nets = build_loss_networks(pname, cfg.lpips_backbone, iname, cfg.identity_weights, "cpu", cfg.perceptual_lambda > 0,
                               cfg.identity_lambda > 0, domain=data_domain(cfg.data, G.img_channels))  # fmt: skip
    for kind, net, what, file, note in (("perceptual", nets.perceptual, "backbone", cfg.lpips_backbone, pnote),
                                        ("identity", nets.identity, "weights", cfg.identity_weights, inote)):  # fmt: skip
        why = f" ({note})" if note else ""
        if net is None:  # an auto perceptual choice switched off by its weight says nothing of what auto would take
            checked.append(f"{kind}: none" + (why if kind == "identity" else ""))
        else:
            checked.append(f"{kind} {nets.names()[kind]}" + (f" ({what} {file})" if file else "") + why)
    if cfg.encoder_init:
        E = Encoder4Editing(encoder_config(cfg.encoder, G, size))
        checked.append(f"encoder initialisation: {init_encoder_weights(E, cfg.encoder_init)}")
    return Preflight(schedule, G.num_ws, checked)
