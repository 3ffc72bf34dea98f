"""Training: the cycle schedule as data (``schedule``), the Ranger optimizer (``cycle_encoding.optim``, re-exported here), the pool of past latent
codes for the latent discriminator (``losses.latent_pool``, re-exported here)."""

from ..losses.latent_pool import LatentPool
from ..optim import Ranger
from .schedule import PRESETS, Schedule, ScheduleState, get_schedule, load_schedule, preset_schedule, save_schedule

__all__ = [
    "PRESETS",
    "LatentPool",
    "Ranger",
    "Schedule",
    "ScheduleState",
    "get_schedule",
    "load_schedule",
    "preset_schedule",
    "save_schedule",
]
