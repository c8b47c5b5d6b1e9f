"""The ``"sparsemoe"`` experts implementation for transformers 5.x.

transformers 5.x routes every experts module decorated with ``@use_experts_implementation``
through ``ExpertsInterface``: the module keeps its router, shared experts, hooks and parameter
names, and the implementation named by ``config._experts_implementation`` receives
``(experts_module, hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k])``.
``register()`` adds sparsemoe there, so that

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="sparsemoe")
    model.set_experts_implementation("sparsemoe")     # or on a live model

run the experts as dispatch -> expert_ffn -> combine. The weights are read in place in every
layout the decorator declares (fused or interleaved gate/up, transposed, with biases): the
layout is passed to the kernels as strides and flags, never converted per step. The gradient
of ``top_k_weights`` flows back into HF's own router.

A module the kernels cannot compute exactly (a custom gate other than GPT-OSS's, an activation
sparsemoe lacks, a post-expert norm, expert-parallel sentinels) runs transformers' own eager
experts instead, with one warning per module class and reason; ``register(on_unsupported=
"error")`` makes that an error. ``experts_plan(model)`` says, per experts module, which runs.

Nothing here imports transformers at import time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from .packing import PackedWeights

NAME = "sparsemoe"
ON_UNSUPPORTED = ("warn", "error")
_settings = {"on_unsupported": "warn", "packed_weights": True}
_warned: set[tuple[str, str]] = set()


class UnsupportedExperts(NotImplementedError):
    """An experts module sparsemoe's kernels cannot compute exactly (with on_unsupported="error")."""


@dataclass(frozen=True)
class ExpertsPlan:
    """How one experts module's weights map onto sparsemoe.ops.expert_ffn."""
    activation: str
    transposed: bool      # weights stored [E, in, out] (GPT-OSS, Llama-4 style)
    interleaved: bool     # gate/up alternate along 2f (GPT-OSS)
    has_bias: bool
    gated: bool
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


# transformers' activation modules, by class name -> sparsemoe's name for the plain activation.
_ACTIVATION_CLASSES = {"SiLUActivation": "silu", "SiLU": "silu", "ReLU": "relu", "GELUActivation": "gelu",
                       "GELU": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                       "PytorchGELUTanh": "gelu_tanh"}


def _activation_of(act_fn) -> str | None:
    name = _ACTIVATION_CLASSES.get(type(act_fn).__name__)
    if name == "gelu" and getattr(act_fn, "approximate", "none") != "none":
        return "gelu_tanh" if act_fn.approximate == "tanh" else None
    return name


def _has_own_gate(module: nn.Module) -> bool:
    """True when the class replaces transformers' default gate (act(gate) * up)."""
    from transformers.integrations.moe import _default_apply_gate
    return getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate


def _is_gpt_oss(module: nn.Module) -> bool:
    return any(cls.__name__ == "GptOssExperts" for cls in type(module).__mro__)


def plan_for(module: nn.Module) -> ExpertsPlan | str:
    """The plan that runs `module` on sparsemoe's kernels, or the reason it cannot."""
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert (has_post_expert_norm) is not supported"
    if getattr(module, "_is_expert_parallel", False):
        return "transformers' own expert parallelism (sentinel expert ids) is not supported; use sparsemoe.distributed"
    gated = bool(getattr(module, "has_gate", True))
    transposed = bool(getattr(module, "is_transposed", False))
    interleaved = not bool(getattr(module, "is_concatenated", True))
    has_bias = bool(getattr(module, "has_bias", False))
    names = ("gate_up_proj" if gated else "up_proj", "down_proj")
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, Tensor) or w.dim() != 3:
            return f"expected a 3-D tensor {name!r}, got {type(w).__name__}"
        if not w.is_floating_point():
            return f"{name!r} has dtype {w.dtype} (quantized weights are not supported)"
    if has_bias:
        for name in names:
            if not isinstance(getattr(module, name + "_bias", None), Tensor):
                return f"has_bias is set but {name + '_bias'!r} is missing"
    alpha, limit = 1.702, 7.0
    if gated and _has_own_gate(module):
        if not _is_gpt_oss(module):
            return f"its own gate {type(module).__qualname__}._apply_gate is not one sparsemoe knows"
        activation = "clamped_swiglu"
        alpha, limit = float(module.alpha), float(module.limit)
    else:
        plain = _activation_of(getattr(module, "act_fn", None))
        if plain is None:
            return f"activation {type(getattr(module, 'act_fn', None)).__name__} is not supported"
        if gated and plain != "silu":
            return f"gated activation {plain}(gate) * up is not supported (only SwiGLU)"
        activation = "swiglu" if gated else plain
    if interleaved and not gated:
        return "interleaved gate/up without a gate"
    return ExpertsPlan(activation, transposed, interleaved, has_bias, gated, alpha, limit)


def _fall_back(module: nn.Module, reason: str, *args):
    where = type(module).__qualname__
    message = f"sparsemoe cannot run the experts of {where}: {reason}"
    if _settings["on_unsupported"] == "error":
        raise UnsupportedExperts(message)
    if (where, reason) not in _warned:
        _warned.add((where, reason))
        warnings.warn(message + "; running transformers' eager experts instead", stacklevel=3)
    # use_experts_implementation wraps the class's own forward with functools.wraps.
    return type(module).forward.__wrapped__(module, *args)


def _weights(module: nn.Module, plan: ExpertsPlan, dtype: torch.dtype):
    w1 = module.gate_up_proj if plan.gated else module.up_proj
    w2 = module.down_proj
    b1 = b2 = None
    if plan.has_bias:
        b1 = module.gate_up_proj_bias if plan.gated else module.up_proj_bias
        b2 = module.down_proj_bias
    if plan.transposed:  # [E, in, out] -> the kernels' [E, out, in], as a strided view
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    if w1.dtype != dtype:  # autocast: the weights in its dtype, as nn.Linear does
        w1, w2 = w1.to(dtype), w2.to(dtype)
        b1, b2 = (None if b is None else b.to(dtype) for b in (b1, b2))
    return w1, w2, b1, b2


def experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts implementation registered as "sparsemoe"."""
    plan = plan_for(module)
    if isinstance(plan, str):
        return _fall_back(module, plan, hidden_states, top_k_index, top_k_weights)
    return run_experts(module, plan, hidden_states, top_k_index, top_k_weights)


def routed_ffn(x: Tensor, ids: Tensor, weights: Tensor | None, w1: Tensor, w2: Tensor, activation: str, *,
               b1: Tensor | None = None, b2: Tensor | None = None, swiglu_alpha: float = 1.702,
               swiglu_limit: float = 7.0, gate_up_interleaved: bool = False, weights_on_input: bool = False,
               capacity: int = -1, token_groups: int = 1, packed: Tensor | None = None) -> Tensor:
    """dispatch -> expert_ffn -> combine for x [T, d] routed to ids [T, k] with weights [T, k],
    in w1's dtype. The one data path of the experts backend and of the patched blocks."""
    E = w1.shape[0]
    x, ids = x.to(w1.dtype), ids.to(torch.int64)
    w = None if weights is None else weights.to(ops.opmath_dtype(x.dtype))
    ffn = dict(activation=activation, b1=b1, b2=b2, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit,
               gate_up_interleaved=gate_up_interleaved, packed=packed)
    if weights_on_input:  # Llama-4 scales each expert's input by its router score
        plan, offsets, slot = ops.dispatch(x[:, :0], ids, E, capacity=capacity, token_groups=token_groups)
        rows = ops.scatter_rows(x, slot, w, plan.shape[0])
        return ops.combine(ops.expert_ffn(rows, offsets, w1, w2, **ffn), slot, None)
    rows, offsets, slot = ops.dispatch(x, ids, E, capacity=capacity, token_groups=token_groups)
    return ops.combine(ops.expert_ffn(rows, offsets, w1, w2, **ffn), slot, w)


# The attribute of an experts module that holds its packed weights (sparsemoe.packing).
PACKED_ATTR = "_sparsemoe_packed"


def run_experts(module: nn.Module, plan: ExpertsPlan, hidden_states: Tensor, top_k_index: Tensor,
                top_k_weights: Tensor) -> Tensor:
    """The experts of `module` on its weights, read in place as `plan` says."""
    device_type = hidden_states.device.type
    weights_dtype = (module.gate_up_proj if plan.gated else module.up_proj).dtype
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else weights_dtype
    w1, w2, b1, b2 = _weights(module, plan, dtype)
    cache, packed = module.__dict__.get(PACKED_ATTR), None
    if _settings["packed_weights"]:
        if cache is None:
            cache = module.__dict__[PACKED_ATTR] = PackedWeights()
        sources = (module.gate_up_proj if plan.gated else module.up_proj, module.down_proj)
        packed = cache.get(sources, w1, w2, plan.activation, plan.interleaved, top_k_index.numel())
    elif cache is not None:
        cache.clear()  # packed before the switch: free the panels
    out = routed_ffn(hidden_states, top_k_index, top_k_weights, w1, w2, plan.activation, b1=b1, b2=b2,
                     swiglu_alpha=plan.swiglu_alpha, swiglu_limit=plan.swiglu_limit,
                     gate_up_interleaved=plan.interleaved, packed=packed)
    return out.to(hidden_states.dtype)


def register(on_unsupported: str = "warn", packed_weights: bool = True) -> None:
    """Register the "sparsemoe" experts implementation with transformers (idempotent; a later
    call's settings replace the earlier ones).

    ``on_unsupported``: what an experts module the kernels cannot run does: "warn" (once per
    class and reason, then transformers' eager experts run) or "error" (UnsupportedExperts).
    ``packed_weights``: on CPU, keep a packed copy of each experts module's weights (in their
    dtype) for the GEMM micro-kernel (sparsemoe.packing); False runs on the weights alone and frees
    the copies already made at each module's next forward (``clear_packed_weights`` frees them now).
    """
    if on_unsupported not in ON_UNSUPPORTED:
        raise ValueError(f"on_unsupported: expected one of {ON_UNSUPPORTED}, got {on_unsupported!r}")
    if not isinstance(packed_weights, bool):
        raise ValueError(f"packed_weights: expected True or False, got {packed_weights!r}")
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:
        raise ImportError("sparsemoe.hf.register needs transformers >= 5 (its ExpertsInterface); "
                          f"for transformers 4.x use sparsemoe.hf.patch_moe_blocks ({err})") from err
    _settings.update(on_unsupported=on_unsupported, packed_weights=packed_weights)
    ExpertsInterface.register(NAME, experts_forward)


def _packed_caches(model: nn.Module) -> list[PackedWeights]:
    return [m.__dict__[PACKED_ATTR] for m in model.modules() if PACKED_ATTR in m.__dict__]


def packed_weights_bytes(model: nn.Module) -> int:
    """Bytes of the packed expert weights the experts modules of `model` hold now."""
    return sum(cache.nbytes for cache in _packed_caches(model))


def clear_packed_weights(model: nn.Module) -> None:
    """Free the packed expert weights of every experts module of `model` (the next forward
    repacks them where packing is on)."""
    for cache in _packed_caches(model):
        cache.clear()


def experts_plan(model: nn.Module) -> dict[str, ExpertsPlan | str]:
    """Per decorated experts module of `model` (by qualified name): the plan sparsemoe runs, or
    the reason it falls back to transformers' eager experts."""
    return {name: plan_for(m) for name, m in model.named_modules()
            if hasattr(m, "has_gate") and hasattr(m, "is_transposed") and hasattr(type(m).forward, "__wrapped__")}


__all__ = ["NAME", "ExpertsPlan", "UnsupportedExperts", "clear_packed_weights", "register", "experts_forward",
           "experts_plan", "packed_weights_bytes", "plan_for", "routed_ffn", "run_experts"]
