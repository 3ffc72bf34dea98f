"""Set-up shared by the training benchmarks (``encoder_training.py``, ``generator_training.py``): thread count, the
kept-memory malloc, the variants asked for, and the line that says what the numbers were measured under."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch


def apply_setup(ap: argparse.ArgumentParser, args: argparse.Namespace, known: Sequence[str]) -> list[str]:
    """Apply ``--threads`` and ``--keep-freed-memory``; return the ``--variants`` asked for (an unknown one is the
    parser's error)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from cycle_encoding.ops import keep_freed_memory

        keep_freed_memory()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in known]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)} (known: {', '.join(known)})")
    return names


def environment() -> str:
    """Threads, torch version and OMP_WAIT_POLICY, for the benchmark's header line."""
    return (
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
