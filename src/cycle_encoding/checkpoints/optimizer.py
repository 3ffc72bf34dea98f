"""The encoder's Ranger state, read from the files that carry it, keyed by parameter NAME (strict: never a partial
load). Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.optimizer".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .e4e import e4e_opts
from .native import default_provenance, read_native, save_native

STATE_KEYS = ("exp_avg", "exp_avg_sq", "slow_buffer")
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
OPTIMIZER_KIND = "encoder-optimizer"
# Ranger's hyper-parameters (this project's names) and the names e4e's Ranger uses for them in its param groups
SETTINGS = ("lr", "betas", "eps", "weight_decay", "alpha", "k", "n_sma_threshold", "use_gc", "gc_conv_only")
E4E_NAMES = {"N_sma_threshhold": "n_sma_threshold"}


@dataclass
class OptimizerState:
    """Ranger's per-parameter state by parameter name, its hyper-parameters, and where it came from."""

    state: dict[str, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def to_state_dict(self, module: nn.Module, where: str | Path = "optimizer state") -> dict[str, Any]:
        """A ``Ranger.state_dict()`` for an optimizer built over ``module.parameters()`` (one group). Strict: every
        name must be a parameter of ``module`` with the same shape."""
        params = dict(module.named_parameters())
        order = {n: i for i, n in enumerate(params)}
        out: dict[int, dict[str, Any]] = {}
        for name, st in self.state.items():
            if name not in params:
                raise CheckpointError(where, f"optimizer state for {name!r}, which the encoder does not have")
            shape = tuple(params[name].shape)
            for k in STATE_KEYS:
                if k in st and tuple(st[k].shape) != shape:
                    raise CheckpointError(
                        where,
                        f"optimizer state {k} of {name!r} has shape {list(st[k].shape)}, the parameter {list(shape)}",
                    )
            out[order[name]] = {
                "step": int(st["step"]),
                **{k: st[k].detach().float().clone() for k in STATE_KEYS if k in st},
            }
        group = {**{k: v for k, v in self.settings.items() if k in SETTINGS}, "params": list(range(len(params)))}
        if "betas" in group:
            group["betas"] = tuple(float(b) for b in group["betas"])
        return {"state": out, "param_groups": [group]}


def parameter_names_e4e(sd: Mapping[str, Any], prefix: str = "encoder") -> list[str]:
    """The ``prefix.*`` parameter names of an e4e-family state dict in its stored order (their module definition
    order), buffers left out, prefix removed."""
    p = prefix + "."
    return [k[len(p) :] for k in sd if k.startswith(p) and not k.endswith(BUFFER_SUFFIXES) and k != p + "latent_avg"]


def _settings_from_group(group: Mapping[str, Any]) -> dict[str, Any]:
    named = {E4E_NAMES.get(k, k): v for k, v in group.items()}
    return {k: tuple(v) if k == "betas" else v for k, v in named.items() if k in SETTINGS}


def _entry(st: Mapping[str, Any]) -> dict[str, Any]:
    return {"step": int(st["step"]), **{k: st[k] for k in STATE_KEYS if k in st}}


def _check_entry(path: str | Path, idx: int, name: str, st: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(st, Mapping) or "step" not in st or "exp_avg" not in st or "exp_avg_sq" not in st:
        keys = sorted(st) if isinstance(st, Mapping) else type(st).__name__
        raise CheckpointError(path, f"optimizer state entry {idx} ({name}) is not a Ranger/Adam state (holds {keys})")
    for k in STATE_KEYS:
        t = st.get(k)
        if t is not None and tuple(t.shape) != shape:
            raise CheckpointError(
                path,
                f"optimizer state entry {idx} maps to parameter {name!r} of shape {list(shape)}, but its {k} has shape "
                f"{list(t.shape)}: the state does not follow this encoder's parameter order",
            )


def _state_by_name(
    opt: Mapping[str, Any], names: list[str], shapes: list[tuple[int, ...]], path: str | Path
) -> dict[str, dict[str, Any]]:
    """An optimizer ``state_dict``'s entries by parameter name: the i-th parameter of its groups is ``names[i]``
    (positions past ``names``: parameters of another network, left out)."""
    index_of = {pid: pos for pos, pid in enumerate(i for g in opt["param_groups"] for i in g.get("params", []))}
    state: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        pos = index_of.get(pid)
        if pos is None:
            raise CheckpointError(path, f"optimizer state entry {pid!r} belongs to no parameter group")
        if pos < len(names):
            _check_entry(path, pos, names[pos], st, shapes[pos])
            state[names[pos]] = _entry(st)
    return state


def from_e4e_checkpoint(obj: Mapping[str, Any], path: str | Path) -> OptimizerState | None:
    """The encoder's Ranger state of an e4e / pSp / Cycle Encoding checkpoint; None when it has no ``optimizer``."""
    opt = obj.get("optimizer")
    if opt is None:
        return None
    if not isinstance(opt, Mapping) or "state" not in opt or "param_groups" not in opt:
        raise CheckpointError(path, "its 'optimizer' entry is not an optimizer state_dict (no state / param_groups)")
    sd = obj["state_dict"]
    names = parameter_names_e4e(sd)
    groups = opt["param_groups"]
    n_state = sum(len(g.get("params", [])) for g in groups)
    opts = e4e_opts(obj)
    if n_state != len(names):
        extra = "" if n_state < len(names) else " (trained with train_decoder?)"
        if not (n_state > len(names) and opts.get("train_decoder")):
            raise CheckpointError(
                path,
                f"the optimizer state covers {n_state} parameters, the encoder.* state dict has {len(names)}{extra}",
            )
    state = _state_by_name(opt, names, [tuple(sd["encoder." + n].shape) for n in names], path)
    settings = _settings_from_group(groups[0]) if groups else {}
    return OptimizerState(state, settings, f"{Path(path).name}: optimizer (e4e layout, {len(state)} entries)")


def from_training_checkpoint(obj: Mapping[str, Any], module: nn.Module, path: str | Path) -> OptimizerState | None:
    """``opt_e`` of a ``train-encoder`` ``checkpoint.pt`` (over ``module.parameters()``), by name."""
    opt = obj.get("opt_e")
    if opt is None:
        return None
    names = [n for n, _ in module.named_parameters()]
    groups = opt["param_groups"]
    n_state = sum(len(g["params"]) for g in groups)
    if n_state != len(names):
        raise CheckpointError(path, f"the optimizer state covers {n_state} parameters, the encoder has {len(names)}")
    state = _state_by_name(opt, names, [tuple(p.shape) for p in module.parameters()], path)
    return OptimizerState(state, _settings_from_group(groups[0]), f"{Path(path).name}: opt_e")


def from_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module, source: str = "") -> OptimizerState:
    """The state of a live optimizer built over ``module.parameters()``, by name."""
    names = {id(p): n for n, p in module.named_parameters()}
    state = {names[id(p)]: _entry(st) for p, st in optimizer.state.items() if st}
    return OptimizerState(state, _settings_from_group(optimizer.param_groups[0]), source)


def companion_path(encoder_file: str | Path) -> Path:
    """Where the optimizer state of ``NAME.safetensors`` lives: ``NAME-optimizer.safetensors`` beside it."""
    p = Path(encoder_file)
    return p.with_name(f"{p.stem}-optimizer.safetensors")


def save_optimizer_state(
    path: str | Path,
    st: OptimizerState,
    module: nn.Module,
    dtype: torch.dtype = torch.float32,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``st`` (for ``module``'s current weights) as a companion file; moments and the slow weights' offset from
    the weights in ``dtype`` (bf16 halves the file)."""
    params = dict(module.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    for name, s in st.state.items():
        if name not in params:
            raise CheckpointError(path, f"optimizer state for {name!r}, which the encoder does not have")
        w = params[name].detach().float().cpu()
        tensors[f"{name}.exp_avg"] = s["exp_avg"].float().cpu().to(dtype)
        tensors[f"{name}.exp_avg_sq"] = s["exp_avg_sq"].float().cpu().to(dtype)
        if "slow_buffer" in s:
            diff = s["slow_buffer"].float().cpu() - w
            if bool(diff.any()):  # equal right after a Lookahead sync: nothing to store
                tensors[f"{name}.slow_minus_weight"] = diff.to(dtype)
        steps[name] = int(s["step"])
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in st.settings.items()}
    return save_native(
        path,
        OPTIMIZER_KIND,
        {"settings": settings, "dtype": str(dtype).replace("torch.", "")},
        tensors,
        provenance or default_provenance(source=st.source),
        extra={"steps": steps},
    )


def load_optimizer_state(path: str | Path, module: nn.Module) -> OptimizerState:
    """Read a companion file written by :func:`save_optimizer_state` for ``module`` (its weights give the slow
    weights back). Strict about names and shapes."""
    nf = read_native(path, kind=OPTIMIZER_KIND, what="an encoder optimizer state")
    params = dict(module.named_parameters())
    steps = nf.extra.get("steps") or {}
    state: dict[str, dict[str, Any]] = {}
    for name, step in steps.items():
        if name not in params:
            raise CheckpointError(path, f"optimizer state for {name!r}, which the encoder does not have")
        w = params[name].detach().float().cpu()
        entry: dict[str, Any] = {"step": int(step)}
        for k in ("exp_avg", "exp_avg_sq", "slow_minus_weight"):
            t = nf.tensors.get(f"{name}.{k}")
            if t is None and k != "slow_minus_weight":
                raise CheckpointError(path, f"no {k} for {name!r}")
            if t is not None and tuple(t.shape) != tuple(w.shape):
                raise CheckpointError(path, f"{k} of {name!r} has shape {list(t.shape)}, the parameter {list(w.shape)}")
            entry[k] = None if t is None else t.float()
        diff = entry.pop("slow_minus_weight")
        entry["slow_buffer"] = w.clone() if diff is None else w + diff  # none stored: the slow weights are the weights
        state[name] = entry
    settings = _settings_from_group(nf.config.get("settings") or {})
    return OptimizerState(state, settings, f"{Path(path).name} ({nf.config.get('dtype', '?')})")
