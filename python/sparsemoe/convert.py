"""Turn a dense model into a Mixture-of-Experts model: ``moeify`` swaps FFN blocks for
``sparsemoe.MoELayer`` in place (sparse upcycling by default), ``moe_aux_loss`` adds the
routers' losses in one line, ``save_moe``/``load_moe`` checkpoint the result with safetensors.

Recognised FFN blocks (found by structure and class name; transformers is never imported):

- gated MLPs with ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` and a SiLU ``act_fn``
  (Llama, Mistral, Qwen2 and their kin) -> ``MoELayer(activation="swiglu")``, in place of the MLP;
- GPT-2's MLP (``c_fc``/``c_proj`` transformers ``Conv1D``, weight ``[in, out]``, biases, its
  ``act`` and residual dropout) -> a :class:`MoEFFN` (MoELayer + the dropout), ``expert_bias=True``;
- BERT-style pairs: a module with ``intermediate`` (``dense`` + ``intermediate_act_fn``) and
  ``output`` (``dense``, ``LayerNorm``, ``dropout``, ``forward(hidden, input_tensor)``);
  ``intermediate`` becomes a :class:`Passthrough` and ``output`` a :class:`MoEBertOutput` that
  computes ``LayerNorm(dropout(moe(x)) + x)``, so the layer computes what it computed;
- ``nn.Sequential(Linear, activation, Linear)`` -> ``MoELayer`` in its place.

Activations: ReLU, GELU (exact), GELU with the tanh approximation (``nn.GELU("tanh")``,
HF ``gelu_new``/``gelu_pytorch_tanh``/``gelu_fast``) and SiLU (the gated MLPs: SwiGLU). Anything
else raises ``ValueError`` rather than converting to a different function.

**Sparse upcycling** (``init="upcycle"``): every expert is a copy of the dense FFN and the router
weight (and bias) is zero. All experts then score alike, the top-k picks experts ``0..k-1``
with softmax weights ``1/E`` that ``renormalize=True`` turns into ``1/k``, and the layer computes
what the dense FFN computed (the default options; capacity limits, sigmoid scoring or
``renormalize=False`` change that). ``expert_noise`` perturbs each expert copy
(``w + expert_noise * rms(w) * N(0, 1)``, per tensor and expert) so that experts differ from
the start.

How the zero router starts learning: with exact copies and ``renormalize=True`` the task loss
alone gives the router **no** gradient (the k renormalised weights always sum to 1 and every
picked expert computes the same output), and the picked experts get identical updates. The
load-balancing loss does give it one: at the symmetric start k experts take every token, so
``moe_aux_loss`` (``aux_coef > 0``) pushes their scores down, the tie breaks, and from then on
the router's rows move apart. Caveat, shown by the tests: experts that start as exact copies
with equal router rows get identical gradients from every one of these losses (and identical Adam
updates), so with ``expert_noise=0`` and ``router_noise=0`` they stay clones in pairs/groups of
tied scores forever (e.g. experts 0 = 1 and 2 = 3 with top_k=2): only some of the routed
capacity is used. Break the symmetry with ``router_noise > 0`` (a small random router: exact
equivalence is kept, because identical experts give the same output whatever renormalised
weights the router assigns; only float rounding of the weights' sum differs) or
``expert_noise > 0`` (outputs then differ slightly from the dense model), and add
``moe_aux_loss(model)`` to the training loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layer import MoELayer

__all__ = ["ConvertedBlock", "ConversionSummary", "MoEBertOutput", "MoEFFN", "Passthrough", "moeify"]

# --- replacement modules -----------------------------------------------------------------------


class Passthrough(nn.Module):
    """Returns its input: stands in for a BERT ``intermediate`` whose work moved into the
    sibling :class:`MoEBertOutput`."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


class MoEFFN(nn.Module):
    """``dropout(moe(x))``: a GPT-2 MLP (its residual dropout kept)."""

    def __init__(self, moe: MoELayer, dropout: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return self.dropout(self.moe(hidden_states))


class MoEBertOutput(nn.Module):
    """``LayerNorm(dropout(moe(hidden_states)) + input_tensor)``: BertIntermediate + BertOutput,
    called as ``output(intermediate(x), x)`` with the intermediate a :class:`Passthrough`."""

    def __init__(self, moe: MoELayer, layer_norm: nn.Module, dropout: nn.Module):
        super().__init__()
        self.moe, self.LayerNorm, self.dropout = moe, layer_norm, dropout

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.moe(hidden_states)) + input_tensor)


# --- summary -----------------------------------------------------------------------------------


@dataclass
class ConvertedBlock:
    name: str
    kind: str
    d_model: int
    d_ff: int
    activation: str
    params_before: int
    params_after: int


class ConversionSummary(list):
    """A list of :class:`ConvertedBlock` rows, printed as a table."""

    def __str__(self) -> str:
        header = ("module", "kind", "d_model", "d_ff", "activation", "params before", "params after")
        rows = [header] + [(r.name, r.kind, str(r.d_model), str(r.d_ff), r.activation, f"{r.params_before:,}",
                            f"{r.params_after:,}") for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 or i == 4 else c.rjust(w) for i, (c, w) in
                           enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        before, after = sum(r.params_before for r in self), sum(r.params_after for r in self)
        lines.append(f"{len(self)} FFN block(s) converted: {before:,} -> {after:,} parameters")
        return "\n".join(lines)


# --- recognising FFN blocks --------------------------------------------------------------------

_SUPPORTED_ACTS = "ReLU, GELU, GELU(tanh) / gelu_new / gelu_pytorch_tanh / gelu_fast, SiLU"
_ACT_BY_CLASS = {
    "ReLU": "relu", "SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
}


def _activation_of(act, where: str) -> str:
    """The sparsemoe activation a module (or an HF ACT2FN entry) computes, or ValueError."""
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, nn.Module):
        for cls in type(act).__mro__:
            if cls.__name__ in _ACT_BY_CLASS:
                return _ACT_BY_CLASS[cls.__name__]
    if act in (torch.relu, nn.functional.relu):
        return "relu"
    if act in (nn.functional.silu,):
        return "silu"
    if act is nn.functional.gelu:
        return "gelu"
    name = type(act).__name__ if isinstance(act, nn.Module) else repr(act)
    raise ValueError(f"activation: {where} uses {name}, which MoELayer cannot express "
                     f"(supported: {_SUPPORTED_ACTS})")


def _is_linear(m) -> bool:
    return type(m) is nn.Linear or isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:  # transformers.pytorch_utils.Conv1D: weight [in, out]
    return any(c.__name__ == "Conv1D" for c in type(m).__mro__) and hasattr(m, "nf") and m.weight.dim() == 2


def _linear_wb(m) -> tuple[Tensor, Tensor | None]:
    """weight as [out, in] and bias of an nn.Linear or a transposed Conv1D."""
    if _is_conv1d(m):
        return m.weight.t(), m.bias
    return m.weight, m.bias


@dataclass
class _Block:
    name: str          # module (or BERT layer) name
    kind: str          # gated_mlp | gpt2_mlp | bert | sequential
    module: nn.Module  # the module holding the FFN (BERT: the layer holding intermediate/output)


def _classify(module: nn.Module) -> str | None:
    if all(_is_linear(getattr(module, n, None)) for n in ("gate_proj", "up_proj", "down_proj")) \
            and hasattr(module, "act_fn"):
        return "gated_mlp"
    if _is_conv1d(getattr(module, "c_fc", None)) and _is_conv1d(getattr(module, "c_proj", None)) \
            and hasattr(module, "act"):
        return "gpt2_mlp"
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if (isinstance(inter, nn.Module) and isinstance(out, nn.Module) and _is_linear(getattr(inter, "dense", None))
            and hasattr(inter, "intermediate_act_fn") and _is_linear(getattr(out, "dense", None))
            and hasattr(out, "LayerNorm") and hasattr(out, "dropout")):
        return "bert"
    if (type(module) is nn.Sequential and len(module) == 3 and _is_linear(module[0]) and _is_linear(module[2])
            and not _is_linear(module[1]) and module[0].out_features == module[2].in_features
            and module[0].in_features == module[2].out_features):
        return "sequential"
    return None


def find_ffn_blocks(model: nn.Module) -> list[_Block]:
    """Every recognised FFN block of ``model``, in module order (nothing inside a found block)."""
    found: list[_Block] = []
    for name, module in model.named_modules():
        if any(name == b.name or name.startswith(b.name + ".") for b in found if b.name):
            continue
        kind = _classify(module)
        if kind is not None:
            found.append(_Block(name, kind, module))
    return found


# --- building the MoE layer --------------------------------------------------------------------


def _dense_weights(block: _Block) -> dict:
    """activation, W1 [width, d_model] (gate rows first), b1, W2 [d_model, d_ff], b2."""
    m, where = block.module, block.name or "<model>"
    if block.kind == "gated_mlp":
        act = _activation_of(m.act_fn, f"{where}.act_fn")
        if act != "silu":
            raise ValueError(f"activation: {where} is a gated MLP with {act}; MoELayer's gated experts are "
                             f"SwiGLU (silu gate) only")
        g, u, d = m.gate_proj, m.up_proj, m.down_proj
        b1 = None if g.bias is None and u.bias is None else torch.cat([
            g.bias if g.bias is not None else g.weight.new_zeros(g.out_features),
            u.bias if u.bias is not None else u.weight.new_zeros(u.out_features)])
        return dict(activation="swiglu", w1=torch.cat([g.weight, u.weight]), b1=b1, w2=d.weight, b2=d.bias,
                    dropout=None)
    if block.kind == "gpt2_mlp":
        act = _activation_of(m.act, f"{where}.act")
        w1, b1 = _linear_wb(m.c_fc)
        w2, b2 = _linear_wb(m.c_proj)
        return dict(activation=act, w1=w1, b1=b1, w2=w2, b2=b2, dropout=getattr(m, "dropout", None))
    if block.kind == "bert":
        act = _activation_of(m.intermediate.intermediate_act_fn, f"{where}.intermediate.intermediate_act_fn")
        return dict(activation=act, w1=m.intermediate.dense.weight, b1=m.intermediate.dense.bias,
                    w2=m.output.dense.weight, b2=m.output.dense.bias, dropout=None)
    act = _activation_of(m[1], f"{where}[1]")
    return dict(activation=act, w1=m[0].weight, b1=m[0].bias, w2=m[2].weight, b2=m[2].bias, dropout=None)


def _noisy(w: Tensor, sigma: float, num_experts: int, gen: torch.Generator | None) -> Tensor:
    """``num_experts`` copies of ``w`` stacked on dim 0, each with relative Gaussian noise."""
    copies = w.detach().unsqueeze(0).expand(num_experts, *w.shape).clone()
    if sigma > 0:
        rms = copies[0].float().pow(2).mean().sqrt().clamp_min(1e-12)
        noise = torch.randn(copies.shape, generator=gen, dtype=torch.float32)
        copies = (copies.float() + sigma * rms * noise.to(copies.device)).to(w.dtype)
    return copies


def _build(block: _Block, num_experts: int, top_k: int, init: str, expert_noise: float, router_noise: float,
           gen: torch.Generator | None, options: dict) -> tuple[nn.Module, MoELayer, dict]:
    dense = _dense_weights(block)
    w1, w2 = dense["w1"], dense["w2"]
    d_model, d_ff = w2.shape[0], w2.shape[1]
    has_bias = dense["b1"] is not None or dense["b2"] is not None
    opts = dict(options)
    if opts.get("expert_bias") is False and has_bias:
        raise ValueError(f"expert_bias: {block.name} has biases; expert_bias=False would drop them")
    opts["expert_bias"] = bool(opts.get("expert_bias", False) or has_bias)
    layer = MoELayer(d_model, d_ff, num_experts, top_k, dense["activation"], device=w1.device, dtype=w1.dtype,
                     **opts)
    if init == "upcycle":
        with torch.no_grad():
            layer.gate_up_proj.copy_(_noisy(w1, expert_noise, num_experts, gen))
            layer.down_proj.copy_(_noisy(w2, expert_noise, num_experts, gen))
            if layer.gate_up_proj_bias is not None:
                for p, b in ((layer.gate_up_proj_bias, dense["b1"]), (layer.down_proj_bias, dense["b2"])):
                    if b is None:
                        p.zero_()
                    else:
                        p.copy_(_noisy(b, expert_noise, num_experts, gen))
            layer.router.weight.zero_()
            if router_noise > 0:
                noise = torch.randn(layer.router.weight.shape, generator=gen, dtype=torch.float32)
                layer.router.weight.copy_(router_noise * noise)
            if layer.router.bias is not None:
                layer.router.bias.zero_()
            if layer.shared_expert is not None:  # starts contributing nothing; learns from there
                layer.shared_expert.down_proj.weight.zero_()
    if block.kind == "gated_mlp" or block.kind == "sequential":
        replacement = layer
    elif block.kind == "gpt2_mlp":
        replacement = MoEFFN(layer, dense["dropout"])
    else:
        replacement = MoEBertOutput(layer, block.module.output.LayerNorm, block.module.output.dropout)
    return replacement, layer, dense


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("model: the model itself is an FFN block; wrap it in a parent module to convert it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def _n_params(*modules: nn.Module) -> int:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def _layer_filter(layers, n: int) -> Callable[[int], bool]:
    if layers is None:
        return lambda i: True
    if callable(layers) and not isinstance(layers, (slice, range)):
        return lambda i: bool(layers(i))
    if isinstance(layers, slice):
        chosen = set(range(n)[layers])
    elif isinstance(layers, int) and not isinstance(layers, bool):
        chosen = {layers % n} if -n <= layers < n else set()
        if not chosen:
            raise ValueError(f"layers: index {layers} out of range for {n} FFN blocks")
    elif isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)):
        chosen = set()
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
                raise ValueError(f"layers: expected block indices in [-{n}, {n}) ({n} FFN blocks found), got {i!r}")
            chosen.add(i % n)
    else:
        raise ValueError(f"layers: expected None, a slice, a set/list/range of block indices or a callable "
                         f"(index) -> bool, got {layers!r}")
    return lambda i: i in chosen


def _target_filter(target) -> Callable[[str, nn.Module], bool]:
    if target is None:
        return lambda name, module: True
    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"target: not a valid regular expression ({e}): {target!r}") from None
        return lambda name, module: pattern.search(name) is not None
    if callable(target):
        return lambda name, module: bool(target(name, module))
    raise ValueError(f"target: expected None, a regex string or a callable (name, module) -> bool, got {target!r}")


_FIXED_OPTIONS = ("d_model", "d_ff", "activation", "device", "dtype")
DEFAULT_ROUTER_NOISE = 0.02


def moeify(model: nn.Module, num_experts: int, top_k: int, *, init: str = "upcycle", expert_noise: float = 0.0,
           router_noise: float | None = None,
           target: str | Callable[[str, nn.Module], bool] | None = None,
           layers: Callable[[int], bool] | slice | Iterable[int] | int | None = None,
           seed: int | None = None, **moe_options) -> ConversionSummary:
    """Replace the FFN blocks of ``model`` with MoE layers, in place; returns a summary.

    ``target``: a regex searched in each block's module name (BERT: the layer holding
    ``intermediate``/``output``), or a predicate ``(name, module) -> bool``.
    ``layers``: which blocks by index among all recognised FFN blocks in module order
    (0-based, counted before ``target`` filters): a callable ``(index) -> bool`` (e.g.
    ``lambda i: i % 2 == 0``), a slice, an int or a set/list/range of ints.
    ``init``: ``"upcycle"`` (experts copy the dense FFN, zero router: same outputs as the dense
    model) or ``"fresh"`` (MoELayer's own initialisation). ``expert_noise``: relative noise on
    the upcycled copies; ``router_noise``: std of a random upcycled router (default 0.02 with
    ``init="upcycle"``; 0 gives the zero router; > 0 keeps the equivalence and breaks the
    experts' symmetry, see the module docs). ``seed`` makes the noise and the fresh initialisation repeatable.
    ``moe_options`` go to :class:`MoELayer` (``capacity_factor``, ``router_jitter``, ...);
    ``activation``, ``d_model`` and ``d_ff`` come from the dense block.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an int in [1, num_experts={num_experts}], got {top_k!r}")
    if init not in ("upcycle", "fresh"):
        raise ValueError(f"init: expected 'upcycle' or 'fresh', got {init!r}")
    if not isinstance(expert_noise, (int, float)) or not math.isfinite(expert_noise) or expert_noise < 0:
        raise ValueError(f"expert_noise: expected a finite number >= 0, got {expert_noise!r}")
    if expert_noise > 0 and init != "upcycle":
        raise ValueError("expert_noise: only applies to init='upcycle'")
    if router_noise is None:
        # A small random router by default: identical expert copies give the dense output whatever
        # renormalised weights they get, and unequal router rows let the copies drift apart.
        router_noise = DEFAULT_ROUTER_NOISE if init == "upcycle" else 0.0
    if not isinstance(router_noise, (int, float)) or not math.isfinite(router_noise) or router_noise < 0:
        raise ValueError(f"router_noise: expected a finite number >= 0, got {router_noise!r}")
    if router_noise > 0 and init != "upcycle":
        raise ValueError("router_noise: only applies to init='upcycle'")
    for key in _FIXED_OPTIONS:
        if key in moe_options:
            raise ValueError(f"{key}: set from the dense block (or its weights), not an option of moeify")
    if moe_options.get("expert_parallel_group") is not None:
        raise ValueError("expert_parallel_group: moeify builds whole layers (the upcycled copies of the dense "
                         "FFN); shard them afterwards with sparsemoe.distributed.shard_experts_(model, group)")
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"seed: expected an int or None, got {seed!r}")

    blocks = find_ffn_blocks(model)
    if not blocks:
        raise ValueError(f"model: no FFN block recognised in {type(model).__name__} (looked for gate/up/down_proj "
                         f"MLPs, GPT-2 MLPs, BERT intermediate/output pairs, Sequential(Linear, act, Linear))")
    keep_index, keep_name = _layer_filter(layers, len(blocks)), _target_filter(target)
    by_index = [b for i, b in enumerate(blocks) if keep_index(i)]
    if not by_index:
        raise ValueError(f"layers: selected none of the {len(blocks)} FFN blocks found")
    selected = [b for b in by_index if keep_name(b.name, b.module)]
    if not selected:
        raise ValueError(f"target: matched none of the FFN blocks {[b.name for b in by_index]}")

    # Check every block (activation, options) before changing anything: all or nothing.
    for b in selected:
        _dense_weights(b)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    summary = ConversionSummary()
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        built = []
        for b in selected:
            replacement, layer, dense = _build(b, num_experts, top_k, init, expert_noise, router_noise, gen,
                                                  moe_options)
            built.append((b, replacement, layer, dense))
    for b, replacement, layer, dense in built:
        if b.kind == "bert":
            before = _n_params(b.module.intermediate, b.module.output)
            _set_submodule(model, f"{b.name}.intermediate" if b.name else "intermediate", Passthrough())
            _set_submodule(model, f"{b.name}.output" if b.name else "output", replacement)
        else:
            before = _n_params(b.module)
            _set_submodule(model, b.name, replacement)
        summary.append(ConvertedBlock(b.name, b.kind, layer.d_model, layer.d_ff, layer.activation, before,
                                      _n_params(replacement)))
    return summary
