"""MoEConfig: every option of an MoE layer, validated once, with presets per model family.

It is the one list of the layer's options: ``MoELayer`` builds one from its keyword arguments
(``layer.config``), ``reference.moe_forward`` reads one, ``sparsemoe.hf`` maps Hugging Face
configs onto one, and checkpoints store one per layer (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

Activation = Literal["swiglu", "clamped_swiglu", "silu", "gelu", "gelu_tanh", "relu"]
Scoring = Literal["softmax", "sigmoid", "softmax_topk"]
Routing = Literal["token_choice", "expert_choice"]
DropPolicy = Literal["position", "probability"]
CapacityScope = Literal["batch", "sequence"]

ACTIVATIONS: tuple[str, ...] = get_args(Activation)
GATED_ACTIVATIONS = ("swiglu", "clamped_swiglu")
SCORINGS: tuple[str, ...] = get_args(Scoring)
_CHOICES = {"activation": ACTIVATIONS, "scoring": SCORINGS, "routing": get_args(Routing),
            "drop_policy": get_args(DropPolicy), "capacity_scope": get_args(CapacityScope)}
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


RUNTIME = {"runtime": True}  # dataclass field metadata: a setting of the run, not of the model


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Every option of :class:`sparsemoe.MoELayer` (see the README's option table).

    Frozen: derive a variant with ``dataclasses.replace(cfg, top_k=4)`` (validated again).
    """

    # --- sizes
    d_model: int
    d_ff: int                                   # hidden width of each expert
    num_experts: int
    top_k: int                                  # experts per token (expert choice: the mean)

    # --- router: scores, picks and weights
    scoring: Scoring = "softmax"
    renormalize: bool = True                    # divide the k picked weights by their sum
    routed_scaling_factor: float = 1.0          # multiplies the routed weights
    router_bias: bool = False
    router_dtype: torch.dtype | None = None     # compute the logits in this dtype (e.g. float32)
    router_jitter: float = 0.0                  # multiplicative U(1-eps, 1+eps) input noise, training only
    selection_bias: bool = False                # aux-loss-free balancing bias, used only to choose
    num_groups: int = 1                         # group-limited routing (DeepSeek-V3)
    topk_groups: int = 1
    routing: Routing = "token_choice"

    # --- capacity (dropless when both are None)
    capacity_factor: float | None = None        # capacity = ceil(factor * tokens * k / E)
    expert_capacity: int | None = None          # an absolute capacity; wins over the factor
    drop_policy: DropPolicy = "position"        # an over-full expert keeps the earliest / most probable
    capacity_scope: CapacityScope = "batch"     # capacity over the batch or per sequence of [..., S, d]

    # --- experts
    activation: Activation = "swiglu"
    expert_bias: bool = False
    swiglu_alpha: float = 1.702                 # clamped_swiglu (GPT-OSS)
    swiglu_limit: float = 7.0
    weights_on_input: bool = False              # scale the expert input by the weight (Llama-4)

    # --- shared expert: an always-on dense FFN added to the routed output
    shared_expert_d_ff: int = 0
    shared_expert_gate: bool = False            # out += sigmoid(x . g) * shared(x) (Qwen2-MoE)

    # --- how the layer runs, not what it computes (expert parallelism: sparsemoe.distributed):
    # these are not serialised (to_dict, checkpoints) nor compared, so a checkpoint moves
    # between world sizes and the configs of all ranks compare equal.
    expert_parallel_group: Any = field(default=None, compare=False, metadata=RUNTIME)  # ProcessGroup / 1-D DeviceMesh
    pad_to_capacity: bool = field(default=False, compare=False, metadata=RUNTIME)  # fixed [E, C] buffers
    # CPU: keep the expert weights packed for the GEMM micro-kernel (ops.pack_expert_weights), one
    # more copy of them in their dtype, rebuilt when they change. False for memory-bound cases.
    packed_weights: bool = field(default=True, compare=False, metadata=RUNTIME)
    # CPU, float32: each token's output bitwise independent of the rest of the batch and of the
    # thread count (router and experts on fixed-order micro-kernel reductions).
    batch_invariant: bool = field(default=False, compare=False, metadata=RUNTIME)

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_experts"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        E = self.num_experts
        if not _is_int(self.top_k) or not 1 <= self.top_k <= E:
            raise ValueError(f"top_k: expected an int in [1, num_experts={E}], got {self.top_k!r}")
        for name, choices in _CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name}: expected True or False, got {getattr(self, f.name)!r}")
        if not _is_int(self.num_groups) or self.num_groups < 1 or E % self.num_groups:
            raise ValueError(f"num_groups: expected a divisor of num_experts={E}, got {self.num_groups!r}")
        if (not _is_int(self.topk_groups) or not 1 <= self.topk_groups <= self.num_groups
                or self.top_k > self.topk_groups * (E // self.num_groups)):
            raise ValueError(f"topk_groups: expected 1 <= topk_groups <= num_groups={self.num_groups} with "
                             f"top_k <= topk_groups * num_experts / num_groups, got {self.topk_groups!r}")
        if not _is_number(self.routed_scaling_factor) or not math.isfinite(self.routed_scaling_factor):
            raise ValueError(f"routed_scaling_factor: expected a finite number, got {self.routed_scaling_factor!r}")
        if self.router_dtype is not None and self.router_dtype not in _DTYPES.values():
            raise ValueError(f"router_dtype: expected None or one of {tuple(_DTYPES)}, got {self.router_dtype!r}")
        if not _is_number(self.router_jitter) or not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter: expected 0 <= jitter < 1, got {self.router_jitter!r}")
        if self.capacity_factor is not None and (not _is_number(self.capacity_factor)
                                                 or not 0 < self.capacity_factor < math.inf):
            raise ValueError(f"capacity_factor: expected a finite positive number or None, "
                             f"got {self.capacity_factor!r}")
        if self.expert_capacity is not None and (not _is_int(self.expert_capacity) or self.expert_capacity < 0):
            raise ValueError(f"expert_capacity: expected an int >= 0 or None, got {self.expert_capacity!r}")
        if self.routing == "expert_choice" and (self.num_groups > 1 or self.weights_on_input or self.selection_bias):
            # Every expert sees every token: group limits and a selection bias have nothing to
            # choose between, and experts keep tokens by probability (drop_policy does not apply).
            raise ValueError("routing: expert_choice does not combine with num_groups > 1, selection_bias "
                             "or weights_on_input")
        for name in ("swiglu_alpha", "swiglu_limit"):
            if not _is_number(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number, got {getattr(self, name)!r}")
        if self.activation == "clamped_swiglu" and not self.swiglu_limit > 0:
            raise ValueError(f"swiglu_limit: expected a positive clamp limit for clamped_swiglu, "
                             f"got {self.swiglu_limit!r}")
        if (not _is_int(self.shared_expert_d_ff) or self.shared_expert_d_ff < 0
                or (self.shared_expert_gate and not self.shared_expert_d_ff)):
            raise ValueError(f"shared_expert_d_ff: expected an int >= 0 (and > 0 with shared_expert_gate), "
                             f"got {self.shared_expert_d_ff!r}")
        if not isinstance(self.pad_to_capacity, bool):
            raise ValueError(f"pad_to_capacity: expected True or False, got {self.pad_to_capacity!r}")
        if self.pad_to_capacity and self.expert_capacity is None and self.capacity_factor is None:
            raise ValueError("pad_to_capacity: needs a capacity (expert_capacity or capacity_factor) to pad to")
        if self.batch_invariant:
            self._check_batch_invariant()
        if self.expert_parallel_group is not None:
            world = group_size(self.expert_parallel_group)
            if E % world:
                raise ValueError(f"expert_parallel_group: num_experts={E} is not divisible by the group's {world} "
                                 f"ranks (each rank holds num_experts / world experts)")
            if world > 1 and self.routing == "expert_choice":
                raise ValueError("routing: expert_choice needs the whole batch on every expert, so it does not "
                                 "combine with expert_parallel_group")

    def _check_batch_invariant(self) -> None:
        # What would make a token's output depend on the rest of its batch, with the reason.
        conflicts = [
            (not self.packed_weights, "packed_weights=False (the experts' fixed-order reductions run on the panels)"),
            (self.expert_parallel_group is not None, "expert_parallel_group (other ranks' experts run on the BLAS)"),
            (self.expert_capacity is not None or self.capacity_factor is not None or self.routing == "expert_choice",
             "a capacity or expert_choice routing (which picks are dropped depends on the other tokens)"),
            (self.shared_expert_d_ff > 0, "a shared expert (its activation runs in torch's elementwise kernels, "
                                          "whose last bits depend on where an element falls in the tensor)"),
            (self.router_jitter > 0, "router_jitter (fresh noise for every batch)"),
            (self.router_dtype not in (None, torch.float32), f"router_dtype={self.router_dtype} (float32 only)"),
        ]
        for conflict, what in conflicts:
            if conflict:
                raise ValueError(f"batch_invariant: not available with {what}")

    def __deepcopy__(self, memo):
        return self  # immutable; a copy of a layer shares its process group

    # --- derived values

    @property
    def gated(self) -> bool:
        """Gated activations read [gate | up] halves: the first projection is 2 * d_ff wide."""
        return self.activation in GATED_ACTIVATIONS

    def capacity(self, tokens_per_group: int) -> int:
        """Per-expert capacity in a group of ``tokens_per_group`` tokens; -1 is dropless.

        ``expert_capacity`` as given, else ``ceil(capacity_factor * tokens * top_k / E)`` (expert
        choice: factor 1 when unset). An expert never holds more picks of a group than the group
        has tokens, so a larger capacity is clamped there: the result is the same, and buffer
        sizes computed from it cannot overflow.
        """
        if self.expert_capacity is not None:
            cap = self.expert_capacity
        else:
            factor = self.capacity_factor
            if factor is None:
                if self.routing == "token_choice":
                    return -1
                factor = 1.0
            need = factor * tokens_per_group * self.top_k / self.num_experts
            cap = tokens_per_group if need >= tokens_per_group else math.ceil(need)
        return min(cap, tokens_per_group)

    # --- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Every option of the model as JSON-ready values (dtypes as names such as ``"float32"``);
        the runtime settings (expert parallelism) are left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name in OPTION_NAMES}
        if out["router_dtype"] is not None:
            out["router_dtype"] = str(out["router_dtype"]).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        """The inverse of :meth:`to_dict`. Unknown keys are refused; missing options take their
        defaults (so configs written before an option existed still load)."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a dict of MoEConfig options, got {type(data).__name__}")
        check_option_names(data, "config")
        data = dict(data)
        dtype = data.get("router_dtype")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"router_dtype: expected None or one of {tuple(_DTYPES)}, got {dtype!r}")
            data["router_dtype"] = _DTYPES[dtype]
        if set(data) & set(RUNTIME_NAMES):
            raise ValueError(f"config: {sorted(set(data) & set(RUNTIME_NAMES))} are settings of a run, not "
                             f"stored options; pass them to MoELayer or dataclasses.replace")
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"config: missing required option(s) {missing}")
        return cls(**data)

    def non_defaults(self) -> dict[str, Any]:
        """The sizes and every option that differs from its default, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default}

    # --- presets: the settings that reproduce each model family's MoE block

    @classmethod
    def mixtral(cls, *, d_model: int, d_ff: int, num_experts: int = 8, top_k: int = 2, **options) -> "MoEConfig":
        """Mixtral: softmax over all experts, top-k, renormalised, SwiGLU experts."""
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, **options)

    @classmethod
    def qwen2_moe(cls, *, d_model: int, d_ff: int, shared_expert_d_ff: int, num_experts: int = 60, top_k: int = 4,
                  norm_topk_prob: bool = False, **options) -> "MoEConfig":
        """Qwen2-MoE: softmax, renormalised with ``norm_topk_prob``, a sigmoid-gated shared expert."""
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, renormalize=norm_topk_prob,
                   shared_expert_d_ff=shared_expert_d_ff, shared_expert_gate=True, **options)

    @classmethod
    def qwen3_moe(cls, *, d_model: int, d_ff: int, num_experts: int = 128, top_k: int = 8,
                  norm_topk_prob: bool = True, **options) -> "MoEConfig":
        """Qwen3-MoE: softmax, renormalised with ``norm_topk_prob``."""
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, renormalize=norm_topk_prob,
                   **options)

    @classmethod
    def olmoe(cls, *, d_model: int, d_ff: int, num_experts: int = 64, top_k: int = 8,
              norm_topk_prob: bool = False, **options) -> "MoEConfig":
        """OLMoE: softmax, renormalised with ``norm_topk_prob``."""
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, renormalize=norm_topk_prob,
                   **options)

    @classmethod
    def deepseek_v3(cls, *, d_model: int, d_ff: int, num_experts: int = 256, top_k: int = 8, num_groups: int = 8,
                    topk_groups: int = 4, routed_scaling_factor: float = 2.5, shared_expert_d_ff: int | None = None,
                    norm_topk_prob: bool = True, **options) -> "MoEConfig":
        """DeepSeek-V3: sigmoid scores, a selection bias, group-limited top-k, scaled weights, a
        float32 router and a shared expert (``d_ff`` wide unless given)."""
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, scoring="sigmoid",
                   renormalize=norm_topk_prob, selection_bias=True, num_groups=num_groups, topk_groups=topk_groups,
                   routed_scaling_factor=routed_scaling_factor, router_dtype=torch.float32,
                   shared_expert_d_ff=d_ff if shared_expert_d_ff is None else shared_expert_d_ff, **options)

    @classmethod
    def gpt_oss(cls, *, d_model: int, d_ff: int, num_experts: int = 32, top_k: int = 4, swiglu_alpha: float = 1.702,
                swiglu_limit: float = 7.0, **options) -> "MoEConfig":
        """GPT-OSS: top-k on the logits then softmax over the k (already summing to 1), biases on
        the router and the experts, clamped SwiGLU."""
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, scoring="softmax_topk",
                   renormalize=False, router_bias=True, expert_bias=True, activation="clamped_swiglu",
                   swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, **options)

    @classmethod
    def llama4(cls, *, d_model: int, d_ff: int, num_experts: int = 16, top_k: int = 1,
               shared_expert_d_ff: int | None = None, **options) -> "MoEConfig":
        """Llama-4 (text): sigmoid weights scale the expert input, outputs add unweighted, and a
        shared expert (``d_ff`` wide unless given)."""
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, scoring="sigmoid",
                   renormalize=False, weights_on_input=True,
                   shared_expert_d_ff=d_ff if shared_expert_d_ff is None else shared_expert_d_ff, **options)

    @classmethod
    def switch(cls, *, d_model: int, d_ff: int, expert_capacity: int, num_experts: int = 8,
               activation: Activation = "relu", **options) -> "MoEConfig":
        """Switch Transformers: top-1 softmax, unrenormalised, a float32 router, a per-sequence
        capacity that keeps the earliest tokens."""
        options.setdefault("router_dtype", torch.float32)
        return cls(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=1, renormalize=False,
                   activation=activation, expert_capacity=expert_capacity, capacity_scope="sequence",
                   drop_policy="position", **options)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(MoEConfig) if not f.metadata.get("runtime"))
RUNTIME_NAMES: tuple[str, ...] = tuple(f.name for f in fields(MoEConfig) if f.metadata.get("runtime"))


def group_size(group) -> int:
    """The world size of a ProcessGroup or of a 1-D DeviceMesh; ValueError for anything else."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"expert_parallel_group: expected a 1-D DeviceMesh, got {group.ndim} dimensions")
        return group.size()
    if not isinstance(group, torch.distributed.ProcessGroup):
        raise ValueError(f"expert_parallel_group: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                         f"got {type(group).__name__}")
    return group.size()


def check_option_names(options, where: str) -> None:
    """Refuse option names MoEConfig does not have, naming them and listing the known ones."""
    unknown = sorted(set(options) - set(OPTION_NAMES) - set(RUNTIME_NAMES))
    if unknown:
        raise ValueError(f"{where}: unknown MoEConfig option(s) {unknown}; known options: {list(OPTION_NAMES)}")
