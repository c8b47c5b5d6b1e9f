"""sparsemoe kernels for the Hugging Face MoE blocks the experts interface does not reach.

``patch_moe_blocks(model)`` replaces, per instance, the computation of:

- Llama-4 text ``Llama4TextMoe`` (its experts are a dense bmm over every expert),
- Switch Transformers ``SwitchTransformersSparseMLP`` (per-expert modules, capacity),
- the transformers 4.x blocks: the per-expert ones of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
  DeepSeek-V3, and GPT-OSS's fused one.

Each patched block still calls its own router module (so hooks that record ``router_logits``
still fire and HF's routing decides), returns what it returned, and keeps its parameters and
their names (``save_pretrained`` writes a stock checkpoint). ``unpatch_moe_blocks`` undoes it.
Blocks reached by the experts interface (transformers 5.x fused experts) are left alone: use
``sparsemoe.hf.register()`` and ``experts_implementation="sparsemoe"`` for them.

Per-expert weights (Switch, 4.x) are stacked into the kernels' [E, ...] layout on every
forward: one copy of the expert weights per step, which the fused 5.x layouts do not pay.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import Tensor, nn

from . import ops
from .hf_experts import ExpertsPlan, routed_ffn, run_experts
from .hf import _PER_EXPERT_DEFAULT, _PER_EXPERT_NAMES, _PLAIN_ACTIVATIONS, PER_EXPERT, detect_layout, family_of, layer_options

_MARK = "_sparsemoe_patched"  # the instance attribute names a patch replaced
_PER_EXPERT_4X = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def _stacked_gated(experts: nn.ModuleList, family: str) -> tuple[Tensor, Tensor]:
    g, u, d = _PER_EXPERT_NAMES.get(family, _PER_EXPERT_DEFAULT)
    w1 = torch.stack([torch.cat([getattr(e, g).weight, getattr(e, u).weight]) for e in experts])
    w2 = torch.stack([getattr(e, d).weight for e in experts])
    return w1, w2


# --- Llama-4 text -------------------------------------------------------------------------------


def _llama4_forward(self, hidden_states: Tensor):
    x = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(x)
    # The router keeps its top-k logits (sigmoid) and zeroes the rest; the same top-k on the
    # same logits gives its picks.
    ids = torch.topk(router_logits, self.top_k, dim=1).indices
    weights = router_scores.gather(1, ids)
    w1, w2 = self.experts.gate_up_proj.transpose(1, 2), self.experts.down_proj.transpose(1, 2)
    routed = routed_ffn(x, ids, weights, w1, w2, "swiglu", weights_on_input=True)
    out = self.shared_expert(x)
    return out + routed.to(out.dtype), router_logits


def _llama4_reason(block: nn.Module) -> str | None:
    act = type(getattr(block.experts, "act_fn", None)).__name__
    return None if act in ("SiLUActivation", "SiLU") else f"experts activation {act} is not SiLU"


# --- Switch Transformers ------------------------------------------------------------------------


def _switch_forward(self, hidden_states: Tensor):
    B, S, d = hidden_states.shape
    router = self.router
    selected, routing_weights, router_logits = router(hidden_states)
    # The router's own rule for the expert of each token (before its capacity mask), so that
    # dispatch's per-sequence capacity keeps exactly the tokens HF's mask keeps.
    probs = torch.softmax(router_logits, dim=-1, dtype=router.dtype).to(router.input_dtype)
    ids = probs.argmax(-1).reshape(-1, 1)
    experts = [self.experts[f"expert_{i}"] for i in range(router.num_experts)]
    w1 = torch.stack([e.wi.weight for e in experts])
    w2 = torch.stack([e.wo.weight for e in experts])
    act = _PLAIN_ACTIVATIONS[self._sparsemoe_activation]
    out = routed_ffn(hidden_states.reshape(-1, d), ids, routing_weights.reshape(-1, 1), w1, w2, act,
                   capacity=min(int(router.expert_capacity), S), token_groups=B)
    out = out.to(hidden_states.dtype).reshape(B, S, d)
    if self._sparsemoe_v4:  # transformers 4.x also returns the routing
        return out, (router_logits, torch.argmax(selected, dim=-1))
    return out


def _switch_reason(block: nn.Module) -> str | None:
    act = block._sparsemoe_activation
    if act not in _PLAIN_ACTIVATIONS:
        return f"dense_act_fn {act!r} is not supported"
    expert = block.experts["expert_0"]
    if block.training and expert.dropout.p > 0:
        return "dropout between the experts' two projections (training with dropout_rate > 0)"
    if expert.wi.bias is not None or expert.wo.bias is not None:
        return "expert biases"
    return None


# --- GPT-OSS under transformers 4.x (fused experts the experts interface does not reach) ------


def _gpt_oss4_forward(self, hidden_states: Tensor):
    router_scores, router_indices = self.router(hidden_states)  # scores [T, E], zero off the top-k
    experts = self.experts
    plan = ExpertsPlan("clamped_swiglu", transposed=True, interleaved=True, has_bias=True, gated=True,
                       swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit))
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = run_experts(experts, plan, x, router_indices, router_scores.gather(1, router_indices))
    return out.reshape(hidden_states.shape), router_scores


# --- transformers 4.x per-expert blocks ---------------------------------------------------------


def _per_expert_forward(self, hidden_states: Tensor):
    B, S, d = hidden_states.shape
    x = hidden_states.reshape(-1, d)
    cfg = self._sparsemoe_config
    router_logits = self.gate(x)
    weights, ids = ops.route(router_logits, cfg.top_k, renormalize=cfg.renormalize, scoring=cfg.scoring)
    w1, w2 = _stacked_gated(self.experts, self._sparsemoe_family)
    out = routed_ffn(x, ids, weights, w1, w2, "swiglu").to(hidden_states.dtype)
    if getattr(self, "shared_expert", None) is not None:  # Qwen2-MoE
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return out.reshape(B, S, d), router_logits


def _deepseek_moe(self, hidden_states: Tensor, topk_indices: Tensor, topk_weights: Tensor) -> Tensor:
    w1, w2 = _stacked_gated(self.experts, "deepseek_v3")
    return routed_ffn(hidden_states, topk_indices, topk_weights, w1, w2, "swiglu").to(hidden_states.dtype)


def _per_expert_reason(block: nn.Module) -> str | None:
    act = getattr(block._sparsemoe_hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} (the gated experts run SwiGLU)"
    if block.training and getattr(block, "jitter_noise", 0) > 0:
        return "router jitter in training (transformers 4.x scales the block's input in place)"
    return None


def _guarded(forward, reason_of, original: str):
    """`forward`, or the block's original computation when `reason_of(block)` names a reason
    (with one warning per class and reason)."""
    def run(self, *args, **kwargs):
        reason = reason_of(self)
        if reason is None:
            return forward(self, *args, **kwargs)
        key = (type(self).__qualname__, reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"sparsemoe cannot run {key[0]}: {reason}; running its own computation instead",
                          stacklevel=2)
        return getattr(type(self), original)(self, *args, **kwargs)
    return run


_warned: set[tuple[str, str]] = set()


def _patch(block: nn.Module, attr: str, fn) -> None:
    setattr(block, attr, types.MethodType(fn, block))
    setattr(block, _MARK, attr)


def _patch_one(block: nn.Module, config) -> bool:
    try:
        family = family_of(block)
    except TypeError:
        return False
    if family == "llama4_text":
        _patch(block, "forward", _guarded(_llama4_forward, _llama4_reason, "forward"))
        return True
    if family == "switch_transformers":
        block._sparsemoe_activation = getattr(config, "dense_act_fn", "relu")
        block._sparsemoe_v4 = type(block.experts).__name__ != "SwitchTransformersExperts"
        _patch(block, "forward", _guarded(_switch_forward, _switch_reason, "forward"))
        return True
    if family == "gpt_oss" and not hasattr(block.experts, "has_gate"):  # 4.x: not decorated
        _patch(block, "forward", _gpt_oss4_forward)
        return True
    if family in _PER_EXPERT_4X and detect_layout(block.state_dict(), family) == PER_EXPERT:
        block._sparsemoe_family, block._sparsemoe_hf_config = family, config
        if family == "deepseek_v3":
            _patch(block, "moe", _guarded(_deepseek_moe, _per_expert_reason, "moe"))
        else:
            block._sparsemoe_config = layer_options(config, family, block)
            _patch(block, "forward", _guarded(_per_expert_forward, _per_expert_reason, "forward"))
        return True
    return False


def _config_of(model: nn.Module, name: str, config):
    """The config of the (sub)model that owns module `name`: the nearest enclosing module with
    a ``config`` (a multimodal model's text config, not the top-level one)."""
    owner = config
    parts = name.split(".")
    for i in range(len(parts)):
        m = model.get_submodule(".".join(parts[:i])) if i else model
        owner = getattr(m, "config", owner)
    return owner


def patch_moe_blocks(model: nn.Module, config=None) -> list[str]:
    """Run `model`'s Llama-4 text, Switch and transformers 4.x per-expert MoE blocks on sparsemoe's
    kernels, in place. Returns the names of the blocks patched (already patched ones are kept).
    `config` defaults to the config of the model that holds each block."""
    patched = []
    for name, block in model.named_modules():
        if hasattr(block, _MARK):
            continue
        if _patch_one(block, _config_of(model, name, config) if name else (config or getattr(model, "config", None))):
            patched.append(name)
    return patched


def unpatch_moe_blocks(model: nn.Module) -> list[str]:
    """Undo patch_moe_blocks: the blocks compute with their own code again. Returns their names."""
    restored = []
    for name, block in model.named_modules():
        attr = block.__dict__.get(_MARK)
        if attr is None:
            continue
        delattr(block, attr)
        delattr(block, _MARK)
        for extra in ("_sparsemoe_activation", "_sparsemoe_v4", "_sparsemoe_family", "_sparsemoe_hf_config",
                      "_sparsemoe_config"):
            block.__dict__.pop(extra, None)
        restored.append(name)
    return restored


__all__ = ["patch_moe_blocks", "unpatch_moe_blocks"]
