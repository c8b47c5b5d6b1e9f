"""Checkpoints of models with MoE layers: ``save_moe`` writes the state dict to a safetensors
file with every MoE layer's :class:`MoEConfig` in the metadata; ``load_moe`` refuses a file whose
tensors or layer configurations differ from the model's, naming the first difference."""

from __future__ import annotations

import json
from collections.abc import Mapping

from torch import Tensor, nn

from . import distributed
from .config import MoEConfig
from .layer import moe_layers

META_KEY = "sparsemoe.moe_layers"    # {layer name: MoEConfig.to_dict()}
ALIAS_KEY = "sparsemoe.aliases"      # {state-dict key: the key whose tensor it shares}


def save_moe(model: nn.Module, path) -> None:
    """Save ``model.state_dict()`` to a safetensors file, with each MoELayer's configuration in
    the metadata. Tensors sharing storage (tied embeddings) are stored once.

    With expert parallelism every rank of the group must call it: the expert shards are gathered
    and rank 0 writes the single-process layout (all experts), which loads at any world size."""
    from safetensors.torch import save_file

    state = distributed.full_state_dict(model)
    if not distributed.is_writer(model):
        distributed.barrier(model)
        return
    tensors, aliases, seen = {}, {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().contiguous()
    configs = {name: m.config.to_dict() for name, m in moe_layers(model)}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(configs), ALIAS_KEY: json.dumps(aliases)})
    distributed.barrier(model)  # the file is complete before any rank goes on (and may read it)


def _json_metadata(meta: Mapping[str, str], key: str, source: str) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata {key!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: metadata {key!r}: expected a JSON object, got {type(value).__name__}")
    return value


def _config_difference(saved: dict, model: nn.Module) -> str | None:
    """The first MoE layer option that differs between the checkpoint and the model, if any."""
    mine = {name: m.config for name, m in moe_layers(model)}
    for name in sorted(set(saved) | set(mine)):
        if name not in mine or name not in saved:
            return f"MoE layer {name!r} is in the {'checkpoint' if name in saved else 'model'} only"
        try:
            theirs = MoEConfig.from_dict(saved[name]).to_dict()
        except (TypeError, ValueError) as e:
            return f"MoE layer {name!r} has an invalid configuration: {e}"
        for key, value in mine[name].to_dict().items():
            if theirs[key] != value:
                return f"MoE layer {name!r} option {key}: expected {value!r} (model), got {theirs[key]!r} (checkpoint)"
    return None


def _state_difference(expected: Mapping[str, tuple], got: Mapping[str, Tensor], sharded: set[str]) -> str | None:
    """The first tensor that is missing, extra, or of another shape or dtype, if any. `expected`
    holds (shape, dtype) in the single-process layout; `sharded` names the expert shards."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        return (f"does not match the model: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, (shape, dtype) in expected.items():
        g = got[k]
        if tuple(g.shape) != tuple(shape) or g.dtype != dtype:
            note = (" (a checkpoint holds every expert; this rank shards them over an expert-parallel group)"
                    if k in sharded else "")
            return (f"tensor {k!r}: expected shape {tuple(shape)} dtype {dtype}{note}, "
                    f"got shape {tuple(g.shape)} dtype {g.dtype}")
    return None


def load_moe(model: nn.Module, path) -> None:
    """Load a :func:`save_moe` checkpoint into ``model`` (converted with the same ``moeify``
    settings). Any MoE layer option that differs (every :class:`MoEConfig` field), any missing or
    extra tensor and any shape or dtype difference raises ``ValueError`` naming it; nothing is
    loaded then. With expert parallelism each rank reads the whole file (the single-process
    layout, from any world size) and keeps its own experts."""
    from safetensors import safe_open

    source = f"checkpoint {path}"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    config_diff = _config_difference(_json_metadata(meta, META_KEY, source), model) if META_KEY in meta else None
    for alias, key in _json_metadata(meta, ALIAS_KEY, source).items():
        if key not in state:
            raise ValueError(f"{source}: metadata {ALIAS_KEY!r}: {alias!r} shares the tensor of {key!r}, "
                             f"which the file does not hold")
        state[alias] = state[key]
    # Both differences, the options first: an option that changes tensor shapes (num_experts,
    # expert_bias, ...) is the cause a user looks for.
    sharded = {n for n, _ in distributed.expert_parameters(model)}
    problems = [p for p in (config_diff, _state_difference(distributed.full_shapes(model), state, sharded)) if p]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(distributed.local_state_dict(model, state), strict=True)
