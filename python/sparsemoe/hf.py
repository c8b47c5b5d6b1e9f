"""Conversion between sparsemoe.MoELayer and the Hugging Face transformers MoE blocks.

Supported blocks (``family`` names are the configs' ``model_type``):

=====================  ==================================  =====================================
family                 block class                         expert weights in the block
=====================  ==================================  =====================================
mixtral                MixtralSparseMoeBlock               5.x fused / 4.x ``experts.{i}.w1|w3|w2``
qwen2_moe              Qwen2MoeSparseMoeBlock              5.x fused / 4.x ``experts.{i}.*_proj``
qwen3_moe              Qwen3MoeSparseMoeBlock              5.x fused / 4.x ``experts.{i}.*_proj``
olmoe                  OlmoeSparseMoeBlock                 5.x fused / 4.x ``experts.{i}.*_proj``
deepseek_v3            DeepseekV3MoE                       5.x fused / 4.x ``experts.{i}.*_proj``
gpt_oss                GptOssMLP                           fused, transposed, gate/up interleaved
llama4_text            Llama4TextMoe                       fused, transposed
switch_transformers    SwitchTransformersSparseMLP         ``experts.expert_{i}.wi|wo``
=====================  ==================================  =====================================

Nothing here imports transformers: blocks are recognised by class name and read through their
``state_dict()``, so checkpoints of either transformers generation convert without it.
The state-dict functions are the whole conversion; ``from_hf``/``to_hf`` add the layer options
(from the config) and the copying.

The layer follows each model's published definition where HF's code deviates from it:
transformers 4.x DeepSeek-V3 masks excluded expert groups with 0.0 instead of -inf (wrong
when score + e_score_correction_bias < 0; 5.x is right), and HF Switch takes the argmax of
router probabilities already rounded to the activation dtype (ties in bfloat16) and, in
float32 training with jitter, jitters the experts' input too (an in-place multiply).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .layer import MoELayer

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
            "llama4_text", "switch_transformers")

BLOCK_CLASSES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
    "GptOssMLP": "gpt_oss",
    "Llama4TextMoe": "llama4_text",
    "SwitchTransformersSparseMLP": "switch_transformers",
}

FUSED, PER_EXPERT = "fused", "per_expert"

# Families whose experts transformers 4.x kept as one nn.Module per expert (5.x fuses them);
# GPT-OSS and Llama 4 were fused in 4.x already, Switch keeps per-expert modules in 5.x.
_LAYOUTS = {
    "mixtral": (FUSED, PER_EXPERT), "qwen2_moe": (FUSED, PER_EXPERT),
    "qwen3_moe": (FUSED, PER_EXPERT), "olmoe": (FUSED, PER_EXPERT),
    "deepseek_v3": (FUSED, PER_EXPERT), "gpt_oss": (FUSED,), "llama4_text": (FUSED,),
    "switch_transformers": (PER_EXPERT,),
}

# Router and shared-expert keys: HF name -> sparsemoe name, per family (None = optional key).
_ROUTER_KEYS = {
    "mixtral": {"gate.weight": "router.weight"},
    "qwen2_moe": {"gate.weight": "router.weight"},
    "qwen3_moe": {"gate.weight": "router.weight"},
    "olmoe": {"gate.weight": "router.weight"},
    "deepseek_v3": {"gate.weight": "router.weight",
                    "gate.e_score_correction_bias": "router.selection_bias"},
    "gpt_oss": {"router.weight": "router.weight", "router.bias": "router.bias"},
    "llama4_text": {"router.weight": "router.weight"},
    "switch_transformers": {"router.classifier.weight": "router.weight",
                            "router.classifier.bias": "router.bias"},
}
_OPTIONAL_KEYS = {"router.classifier.bias"}  # Switch: config.router_bias
_SHARED_PREFIX = {"qwen2_moe": "shared_expert.", "deepseek_v3": "shared_experts.",
                  "llama4_text": "shared_expert."}
_SHARED_NAMES = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

# Expert names of the per-expert (4.x) layout: gate, up, down.
_PER_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_PER_EXPERT_DEFAULT = ("gate_proj", "up_proj", "down_proj")

# ACT2FN names -> sparsemoe activations, for the ungated (Switch) experts.
_PLAIN_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


# --- family and layout ------------------------------------------------------------------------


def family_of(block: nn.Module) -> str:
    """The family of a HF MoE block, by class name (its own or a base class's), so that
    transformers 4.x and 5.x blocks and subclasses are recognised without importing either."""
    for cls in type(block).__mro__:
        if cls.__name__ in BLOCK_CLASSES:
            return BLOCK_CLASSES[cls.__name__]
    raise TypeError(f"block: expected one of the Hugging Face MoE blocks {sorted(BLOCK_CLASSES)}, "
                    f"got {type(block).__module__}.{type(block).__qualname__}")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def detect_layout(state_dict: Mapping[str, Tensor], family: str) -> str:
    """'fused' (3-D ``experts.gate_up_proj``/``experts.down_proj``, transformers 5.x) or
    'per_expert' (``experts.{i}.*`` Linear weights, transformers 4.x; Switch in both)."""
    _check_family(family)
    fused = "experts.gate_up_proj" in state_dict or "experts.down_proj" in state_dict
    per_expert = any(re.match(r"experts\.(expert_)?\d+\.", k) for k in state_dict)
    if fused and per_expert:
        raise ValueError("state_dict: holds both fused (experts.gate_up_proj) and per-expert "
                         "(experts.{i}.*) expert weights")
    layout = FUSED if fused else PER_EXPERT if per_expert else None
    if layout is None or layout not in _LAYOUTS[family]:
        raise ValueError(f"state_dict: expected {family} expert weights in the "
                         f"{' or '.join(_LAYOUTS[family])} layout, got keys {sorted(state_dict)}")
    return layout


# --- options ------------------------------------------------------------------------------------


def _gated(config, family: str) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act: expected 'silu' for the gated {family} experts "
                         f"(sparsemoe's gated activation is SwiGLU), got {act!r}")


# The Hugging Face config attributes holding d_model, each expert's d_ff and the expert count.
_SIZE_KEYS = {
    "mixtral": ("hidden_size", "intermediate_size", "num_local_experts"),
    "qwen2_moe": ("hidden_size", "moe_intermediate_size", "num_experts"),
    "qwen3_moe": ("hidden_size", "moe_intermediate_size", "num_experts"),
    "olmoe": ("hidden_size", "intermediate_size", "num_experts"),
    "deepseek_v3": ("hidden_size", "moe_intermediate_size", "n_routed_experts"),
    "gpt_oss": ("hidden_size", "intermediate_size", "num_local_experts"),
    "llama4_text": ("hidden_size", "intermediate_size", "num_local_experts"),
    "switch_transformers": ("d_model", "d_ff", "num_experts"),
}


def layer_options(config, family: str, block: nn.Module | None = None) -> MoEConfig:
    """The MoEConfig (sizes and options) of a HF config's MoE blocks: the family's preset.

    GPT-OSS's alpha/limit come from the block when given: transformers 4.x hard-codes them in
    the experts and ignores the config's values.
    """
    _check_family(family)
    sizes = {}
    for name, key in zip(("d_model", "d_ff", "num_experts"), _SIZE_KEYS[family]):
        if getattr(config, key, None) is None:
            raise ValueError(f"config.{key}: expected the {name} of the {family} MoE blocks, got none")
        sizes[name] = getattr(config, key)
    if family == "switch_transformers":
        act = config.dense_act_fn
        if act not in _PLAIN_ACTIVATIONS:
            raise ValueError(f"config.dense_act_fn: expected one of {sorted(_PLAIN_ACTIVATIONS)}, got {act!r}")
        return MoEConfig.switch(**sizes, expert_capacity=int(config.expert_capacity),
                                activation=_PLAIN_ACTIVATIONS[act], router_bias=bool(config.router_bias),
                                router_dtype=getattr(torch, config.router_dtype),
                                router_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0))
    sizes["top_k"] = config.num_experts_per_tok
    if family == "gpt_oss":
        experts = getattr(block, "experts", None)
        alpha = getattr(experts, "alpha", getattr(config, "swiglu_alpha", 1.702))
        limit = getattr(experts, "limit", getattr(config, "swiglu_limit", 7.0))
        return MoEConfig.gpt_oss(**sizes, swiglu_alpha=float(alpha), swiglu_limit=float(limit))
    _gated(config, family)
    if family == "mixtral":
        # Published Mixtral has no jitter; HF's (off by default) scales the whole block input,
        # sparsemoe's only the router input, as Switch defines it.
        return MoEConfig.mixtral(**sizes, router_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0))
    if family == "qwen2_moe":
        return MoEConfig.qwen2_moe(**sizes, norm_topk_prob=bool(config.norm_topk_prob),
                                   shared_expert_d_ff=config.shared_expert_intermediate_size)
    if family == "qwen3_moe":
        return MoEConfig.qwen3_moe(**sizes, norm_topk_prob=bool(config.norm_topk_prob))
    if family == "olmoe":
        return MoEConfig.olmoe(**sizes, norm_topk_prob=bool(config.norm_topk_prob))
    if family == "deepseek_v3":
        return MoEConfig.deepseek_v3(**sizes, norm_topk_prob=bool(config.norm_topk_prob), num_groups=config.n_group,
                                     topk_groups=config.topk_group,
                                     routed_scaling_factor=float(config.routed_scaling_factor),
                                     shared_expert_d_ff=sizes["d_ff"] * config.n_shared_experts)
    return MoEConfig.llama4(**sizes, shared_expert_d_ff=config.intermediate_size)


# --- state dicts ----------------------------------------------------------------------------------


def _take(sd: Mapping[str, Tensor], key: str, context: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"state_dict: missing {key!r} ({context}); got keys {sorted(sd)}")
    return sd[key]


def _expert_indices(sd: Mapping[str, Tensor], pattern: str) -> int:
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"state_dict: expected experts numbered 0..E-1, got {ids}")
    return len(ids)


def _check_2d_stack(tensors: list[Tensor], what: str) -> None:
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.dim() != 2 or t.shape != shape:
            raise ValueError(f"state_dict: expected every {what} to have shape {tuple(shape)}, "
                             f"got {tuple(t.shape)} for expert {i}")


def from_hf_state_dict(state_dict: Mapping[str, Tensor], family: str) -> dict[str, Tensor]:
    """A HF block's state dict (either layout) -> a MoELayer state dict.

    Every output tensor is a fresh contiguous copy in the input's dtype: converting back
    gives the same bits.
    """
    layout = detect_layout(state_dict, family)
    sd = dict(state_dict)
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return _take(sd, key, f"a {family} block's weights")

    for hf_key, key in _ROUTER_KEYS[family].items():
        if hf_key in _OPTIONAL_KEYS and hf_key not in sd:
            continue
        out[key] = take(hf_key).detach().clone()

    if family == "switch_transformers":
        E = _expert_indices(sd, r"experts\.expert_(\d+)\.")
        wi = [take(f"experts.expert_{i}.wi.weight") for i in range(E)]
        wo = [take(f"experts.expert_{i}.wo.weight") for i in range(E)]
        _check_2d_stack(wi, "experts.expert_{i}.wi.weight")
        _check_2d_stack(wo, "experts.expert_{i}.wo.weight")
        out["gate_up_proj"] = torch.stack(wi).detach()
        out["down_proj"] = torch.stack(wo).detach()
    elif layout == PER_EXPERT:
        g, u, d = _PER_EXPERT_NAMES.get(family, _PER_EXPERT_DEFAULT)
        E = _expert_indices(sd, r"experts\.(\d+)\.")
        gate = [take(f"experts.{i}.{g}.weight") for i in range(E)]
        up = [take(f"experts.{i}.{u}.weight") for i in range(E)]
        down = [take(f"experts.{i}.{d}.weight") for i in range(E)]
        for name, ts in ((g, gate), (u, up), (d, down)):
            _check_2d_stack(ts, f"experts.{{i}}.{name}.weight")
        if gate[0].shape != up[0].shape:
            raise ValueError(f"state_dict: expected experts.{{i}}.{u}.weight of shape "
                             f"{tuple(gate[0].shape)} (as {g}), got {tuple(up[0].shape)}")
        out["gate_up_proj"] = torch.stack([torch.cat([a, b], 0) for a, b in zip(gate, up)]).detach()
        out["down_proj"] = torch.stack(down).detach()
    else:
        gate_up, down = take("experts.gate_up_proj"), take("experts.down_proj")
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
            raise ValueError(f"state_dict: expected experts.gate_up_proj and experts.down_proj of "
                             f"shape [E, ., .], got {tuple(gate_up.shape)} and {tuple(down.shape)}")
        if family in ("gpt_oss", "llama4_text"):
            # HF stores these transposed: gate_up [E, d, 2f], down [E, f, d].
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if family == "gpt_oss":
            # Interleaved columns: gate = 0::2, up = 1::2; sparsemoe keeps gate rows first.
            bias = take("experts.gate_up_proj_bias")
            if bias.shape != gate_up.shape[:2]:
                raise ValueError(f"state_dict: expected experts.gate_up_proj_bias of shape "
                                 f"{tuple(gate_up.shape[:2])}, got {tuple(bias.shape)}")
            gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], 1)
            out["gate_up_proj_bias"] = torch.cat([bias[:, 0::2], bias[:, 1::2]], 1).detach().contiguous()
            out["down_proj_bias"] = take("experts.down_proj_bias").detach().clone()
        out["gate_up_proj"] = gate_up.detach().contiguous().clone()
        out["down_proj"] = down.detach().contiguous().clone()

    if family in _SHARED_PREFIX:
        for name in _SHARED_NAMES:
            out[f"shared_expert.{name}"] = take(_SHARED_PREFIX[family] + name).detach().clone()
    if family == "qwen2_moe":
        out["shared_expert_gate.weight"] = take("shared_expert_gate.weight").detach().clone()

    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"state_dict: unexpected keys for a {family} block ({layout} layout): {unused}")
    return out


def to_hf_state_dict(state_dict: Mapping[str, Tensor], family: str, layout: str = FUSED) -> dict[str, Tensor]:
    """A MoELayer state dict -> a HF block's state dict in `layout` ('fused' for transformers
    5.x, 'per_expert' for 4.x; Switch is always per-expert, GPT-OSS and Llama 4 always fused)."""
    _check_family(family)
    if layout not in _LAYOUTS[family]:
        raise ValueError(f"layout: expected one of {_LAYOUTS[family]} for {family}, got {layout!r}")
    sd = dict(state_dict)
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return _take(sd, key, f"a MoELayer's weights for a {family} block").detach()

    out: dict[str, Tensor] = {}
    for hf_key, key in _ROUTER_KEYS[family].items():
        if hf_key in _OPTIONAL_KEYS and key not in sd:
            continue
        out[hf_key] = take(key).clone()

    gate_up, down = take("gate_up_proj"), take("down_proj")
    E = gate_up.shape[0]
    if family == "switch_transformers":
        for i in range(E):
            out[f"experts.expert_{i}.wi.weight"] = gate_up[i].clone()
            out[f"experts.expert_{i}.wo.weight"] = down[i].clone()
    elif layout == PER_EXPERT:
        g, u, d = _PER_EXPERT_NAMES.get(family, _PER_EXPERT_DEFAULT)
        f = gate_up.shape[1] // 2
        for i in range(E):
            out[f"experts.{i}.{g}.weight"] = gate_up[i, :f].clone()
            out[f"experts.{i}.{u}.weight"] = gate_up[i, f:].clone()
            out[f"experts.{i}.{d}.weight"] = down[i].clone()
    else:
        if family == "gpt_oss":
            f = gate_up.shape[1] // 2
            bias = take("gate_up_proj_bias")
            inter, inter_bias = torch.empty_like(gate_up), torch.empty_like(bias)
            inter[:, 0::2], inter[:, 1::2] = gate_up[:, :f], gate_up[:, f:]
            inter_bias[:, 0::2], inter_bias[:, 1::2] = bias[:, :f], bias[:, f:]
            gate_up = inter
            out["experts.gate_up_proj_bias"] = inter_bias
            out["experts.down_proj_bias"] = take("down_proj_bias").clone()
        if family in ("gpt_oss", "llama4_text"):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        out["experts.gate_up_proj"] = gate_up.contiguous().clone()
        out["experts.down_proj"] = down.contiguous().clone()

    if family in _SHARED_PREFIX:
        for name in _SHARED_NAMES:
            out[_SHARED_PREFIX[family] + name] = take(f"shared_expert.{name}").clone()
    if family == "qwen2_moe":
        out["shared_expert_gate.weight"] = take("shared_expert_gate.weight").clone()
    # A weight the block has no place for (a shared expert, a bias) would be lost silently.
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"state_dict: the {family} block has no place for {unused}")
    return out


def _load(target: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    """Copy `sd` into `target`'s tensors in place, after checking keys and shapes, keeping the
    target's dtypes (HF blocks can hold mixed dtypes, e.g. a float32 Switch router)."""
    own = target.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what}: state dict keys do not match (missing {missing}, unexpected {unexpected})")
    for key, value in sd.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{what}: expected {key!r} of shape {tuple(own[key].shape)}, "
                             f"got {tuple(value.shape)}")
    with torch.no_grad():
        for key, value in sd.items():
            own[key].copy_(value)


# --- modules ------------------------------------------------------------------------------------


def from_hf(block: nn.Module, config, family: str | None = None) -> MoELayer:
    """A MoELayer computing what `block` computes (its published definition where HF deviates),
    with copies of its weights, on its device, in its expert weights' dtype."""
    family = family or family_of(block)
    _check_family(family)
    sd = from_hf_state_dict(block.state_dict(), family)
    ref = sd["down_proj"]
    layer = MoELayer.from_config(layer_options(config, family, block), device=ref.device, dtype=ref.dtype)
    # Keep the router in the block's dtype (a Switch router becomes float32 after its first
    # forward) so that to_hf gives back the same bits.
    with torch.no_grad():
        for p in (layer.router.weight, getattr(layer.router, "bias", None)):
            if p is not None and p.dtype != sd["router.weight"].dtype:
                p.data = p.data.to(sd["router.weight"].dtype)
    _load(layer, sd, f"from_hf ({family})")
    layer.train(block.training)
    return layer


def to_hf(layer: MoELayer, block: nn.Module, family: str | None = None) -> nn.Module:
    """Write `layer`'s weights into `block` (in its own layout and dtypes) and return it.
    The block's options come from its config: only weights are written."""
    family = family or family_of(block)
    layout = detect_layout(block.state_dict(), family)
    _load(block, to_hf_state_dict(layer.state_dict(), family, layout), f"to_hf ({family} block)")
    return block


# The experts backend and the block patches build on the tables above.
from .hf_experts import (UnsupportedExperts, clear_packed_weights, experts_plan, packed_weights_bytes,  # noqa: E402
                         register)
from .hf_patch import patch_moe_blocks, unpatch_moe_blocks  # noqa: E402

__all__ = ["FAMILIES", "family_of", "detect_layout", "layer_options", "from_hf_state_dict",
           "to_hf_state_dict", "from_hf", "to_hf", "register", "experts_plan", "UnsupportedExperts",
           "packed_weights_bytes", "clear_packed_weights", "patch_moe_blocks", "unpatch_moe_blocks"]
