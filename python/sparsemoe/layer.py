"""MoELayer: a drop-in replacement for a transformer FFN block."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops
from .losses import balance_loss_from_probs, router_probs, z_loss
from .routing import Router, capacity_for, check_choice
from .shared_expert import SharedExpert


class MoELayer(nn.Module):
    """Routed Mixture-of-Experts FFN: ``[..., d_model] -> [..., d_model]``.

    Every routing scheme of today's MoE models is an option of this one layer (see the README's
    table for the settings that reproduce Mixtral, Qwen, OLMoE, DeepSeek-V3, GPT-OSS, Llama-4 and
    Switch); ``sparsemoe.hf`` converts their Hugging Face blocks both ways.

    Parameters use the Hugging Face fused layout: ``router.weight [E, d_model]``,
    ``gate_up_proj [E, 2*d_ff, d_model]`` (gate rows first) for gated activations or
    ``[E, d_ff, d_model]`` for the plain ones, and ``down_proj [E, d_model, d_ff]``.

    After each forward these stay on the device (reading them is the caller's choice):
    ``aux_loss`` (load balancing, 1.0 when balanced), ``z_loss``, ``router_logits``,
    ``tokens_per_expert`` (kept picks), ``dropped_fraction`` and ``router_entropy`` (nats).
    They are computed from the last forward's routing when first read (so read ``aux_loss``
    and ``z_loss`` before that forward's backward), and keep its autograd graph alive until
    the next forward.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int,
                 activation: str = "swiglu", renormalize: bool = True, *,
                 scoring: str = "softmax", router_bias: bool = False, router_dtype: torch.dtype | None = None,
                 selection_bias: bool = False, num_groups: int = 1, topk_groups: int = 1,
                 routed_scaling_factor: float = 1.0, router_jitter: float = 0.0,
                 routing: str = "token_choice", capacity_factor: float | None = None,
                 expert_capacity: int | None = None, drop_policy: str = "position",
                 capacity_scope: str = "batch", shared_expert_d_ff: int = 0, shared_expert_gate: bool = False,
                 expert_bias: bool = False, weights_on_input: bool = False,
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int in [1, num_experts={num_experts}], got {top_k!r}")
        check_choice("activation", activation, ops.ACTIVATIONS)
        check_choice("scoring", scoring, ops.SCORINGS)
        check_choice("routing", routing, ("token_choice", "expert_choice"))
        check_choice("drop_policy", drop_policy, ("position", "probability"))
        check_choice("capacity_scope", capacity_scope, ("batch", "sequence"))
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups: expected a divisor of num_experts={num_experts}, got {num_groups!r}")
        if not 1 <= topk_groups <= num_groups or top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(f"topk_groups: expected 1 <= topk_groups <= num_groups={num_groups} with top_k <= "
                             f"topk_groups * num_experts / num_groups, got {topk_groups!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor: expected a positive number or None, got {capacity_factor!r}")
        if expert_capacity is not None and (not isinstance(expert_capacity, int) or expert_capacity < 0):
            raise ValueError(f"expert_capacity: expected an int >= 0 or None, got {expert_capacity!r}")
        if routing == "expert_choice" and (num_groups > 1 or weights_on_input or selection_bias):
            # Every expert sees every token: group limits and a selection bias have nothing to
            # choose between, and experts keep tokens by probability (drop_policy does not apply).
            raise ValueError("routing: expert_choice does not combine with num_groups > 1, selection_bias "
                             "or weights_on_input")
        if shared_expert_d_ff < 0 or (shared_expert_gate and not shared_expert_d_ff):
            raise ValueError(f"shared_expert_d_ff: expected >= 0 (and > 0 with shared_expert_gate), "
                             f"got {shared_expert_d_ff!r}")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.activation, self.renormalize, self.scoring = activation, renormalize, scoring
        self.num_groups, self.topk_groups, self.routed_scaling_factor = num_groups, topk_groups, routed_scaling_factor
        self.routing, self.capacity_factor, self.expert_capacity = routing, capacity_factor, expert_capacity
        self.drop_policy, self.capacity_scope = drop_policy, capacity_scope
        self.weights_on_input, self.swiglu_alpha, self.swiglu_limit = weights_on_input, swiglu_alpha, swiglu_limit

        factory = {"device": device, "dtype": dtype}
        gated = activation in ops.GATED_ACTIVATIONS
        width = 2 * d_ff if gated else d_ff
        self.router = Router(d_model, num_experts, router_bias, selection_bias, router_dtype, router_jitter, **factory)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, width, d_model, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, width, **factory)) if expert_bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if expert_bias else None
        self.shared_expert = (SharedExpert(d_model, shared_expert_d_ff, activation, gated, swiglu_alpha,
                                           swiglu_limit, **factory) if shared_expert_d_ff else None)
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False, **factory) if shared_expert_gate else None
        self.router_logits: Tensor | None = None
        self._routing: tuple | None = None  # the last forward's (logits, ids, offsets, slot, padding_mask)
        self._stats: dict[str, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert is initialised like a pair of nn.Linear layers (uniform, +-1/sqrt(fan_in))."""
        self.router.reset_parameters()
        for w, b, fan_in in ((self.gate_up_proj, self.gate_up_proj_bias, self.d_model),
                             (self.down_proj, self.down_proj_bias, self.d_ff)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            if b is not None:
                nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for module in (self.shared_expert, self.shared_expert_gate):
            if module is not None:
                for child in module.modules():
                    if isinstance(child, nn.Linear):
                        child.reset_parameters()

    def _token_groups(self, shape: torch.Size) -> int:
        # capacity_scope="sequence": every sequence of an input [..., S, d] has its own capacity.
        if self.capacity_scope == "sequence" and len(shape) >= 3:
            return math.prod(shape[:-2])
        return 1

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``padding_mask`` (``[...]``, True or 1 for real tokens) keeps padding out of the aux
        loss, the z-loss and the router entropy. Padding tokens are still routed, as in the models
        this layer reproduces, so they count in ``tokens_per_expert`` and ``dropped_fraction``
        and take capacity like any token."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
            raise ValueError(f"padding_mask: expected shape {tuple(x.shape[:-1])} (x without its last dim), "
                             f"got {tuple(padding_mask.shape)}")
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        # The router reads the input as given: under autocast its linear is autocast like any
        # nn.Linear, unless router_dtype asks for a wider dtype.
        logits = self.router(tokens)
        w1, w2, b1, b2 = self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias
        device_type = tokens.device.type
        if torch.is_autocast_enabled(device_type):
            # Custom ops are not autocast by torch: run the experts in the autocast dtype the
            # way nn.Linear would; routing math stays in float32 inside route.
            compute = torch.get_autocast_dtype(device_type)
            tokens, w1, w2 = tokens.to(compute), w1.to(compute), w2.to(compute)
            b1, b2 = (None if b is None else b.to(compute) for b in (b1, b2))

        T, E = tokens.shape[0], self.num_experts
        groups = self._token_groups(shape)
        if self.routing == "token_choice":
            weights, ids = ops.route(logits, self.top_k, self.renormalize, self.scoring, self.router.selection_bias,
                                     self.num_groups, self.topk_groups, self.routed_scaling_factor)
            capacity = capacity_for(T // groups, self.top_k, E, self.capacity_factor, self.expert_capacity)
            priority = weights.detach() if self.drop_policy == "probability" and capacity >= 0 else None
        else:
            # Expert choice: every token offers itself to every expert; each expert keeps its
            # best-scored tokens up to its capacity (top_k is the mean experts per token).
            weights, ids = ops.route(logits, E, False, self.scoring, self.router.selection_bias, 1, 1,
                                     self.routed_scaling_factor)
            capacity = capacity_for(T // groups, self.top_k, E, self.capacity_factor or 1.0, self.expert_capacity)
            priority = weights.detach()
        weights = weights.to(ops.opmath_dtype(tokens.dtype))
        if self.weights_on_input:
            # Llama-4: the router weight scales each expert's input and outputs add up unweighted.
            # Dispatch only plans (a zero-width x copies nothing); scatter_rows writes the rows.
            plan, offsets, slot = ops.dispatch(tokens[:, :0], ids, E, capacity, priority, groups)
            x_in = ops.scatter_rows(tokens, slot, weights, plan.shape[0])
            y = ops.expert_ffn(x_in, offsets, w1, w2, self.activation, b1, b2, self.swiglu_alpha, self.swiglu_limit)
            out = ops.combine(y, slot, None)
        else:
            x_sorted, offsets, slot = ops.dispatch(tokens, ids, E, capacity, priority, groups)
            y = ops.expert_ffn(x_sorted, offsets, w1, w2, self.activation, b1, b2, self.swiglu_alpha,
                               self.swiglu_limit)
            out = ops.combine(y, slot, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens).to(shared.dtype)) * shared
            out = out + shared

        self.router_logits = logits
        self._routing = (logits, ids, offsets, slot, padding_mask)
        self._stats = None
        return out.reshape(shape)

    # The statistics are computed from the last forward's routing when first read, so a forward
    # whose caller reads none of them (inference, decoding) does not pay for them: at one token
    # they would cost about half as much as the experts themselves.
    aux_loss = property(lambda self: self._stat("aux_loss"), doc="load-balancing loss, 1.0 when balanced")
    z_loss = property(lambda self: self._stat("z_loss"), doc="router z-loss")
    tokens_per_expert = property(lambda self: self._stat("tokens_per_expert"), doc="kept picks per expert")
    dropped_fraction = property(lambda self: self._stat("dropped_fraction"), doc="picks dropped by capacity")
    router_entropy = property(lambda self: self._stat("router_entropy"), doc="mean routing entropy (nats)")

    def _stat(self, name: str) -> Tensor | None:
        if self._stats is None:
            if self._routing is None:
                return None
            self._stats = self._compute_stats(*self._routing)
        return self._stats[name]

    def _compute_stats(self, logits: Tensor, ids: Tensor, offsets: Tensor, slot: Tensor,
                       padding_mask: Tensor | None) -> dict[str, Tensor]:
        stats = {"tokens_per_expert": offsets.diff()}
        probs = router_probs(logits, self.scoring)  # once, for the aux loss and the entropy
        if self.routing == "token_choice":
            stats["aux_loss"] = balance_loss_from_probs(probs, ids, padding_mask)
            stats["dropped_fraction"] = 1 - offsets[-1].to(torch.float32) / max(slot.numel(), 1)
        else:  # balanced by construction; a token no expert picked is the dropped one
            stats["aux_loss"] = logits.new_zeros((), dtype=torch.float32)
            stats["dropped_fraction"] = (1 - (slot >= 0).any(1).float().mean() if slot.shape[0]
                                         else logits.new_zeros(()))
        stats["z_loss"] = z_loss(logits, padding_mask)
        with torch.no_grad():
            p = probs.detach()
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
            if padding_mask is not None:
                real = padding_mask.reshape(-1).to(entropy.dtype)
                stats["router_entropy"] = (entropy * real).sum() / real.sum().clamp_min(1)
            else:
                stats["router_entropy"] = entropy.mean() if entropy.numel() else entropy.new_zeros(())
        return stats

    def update_selection_bias(self, rate: float = 1e-3) -> None:
        """One aux-loss-free balancing step (DeepSeek-V3) from the last forward's expert load:
        raise the selection bias of under-loaded experts by ``rate``, lower the over-loaded."""
        if self.tokens_per_expert is None:
            raise RuntimeError("update_selection_bias: run a forward first (the step uses its expert load)")
        self.router.update_selection_bias(self.tokens_per_expert, rate)

    def __getstate__(self):
        # The last forward's statistics hang on that step's autograd graph: copies and pickles
        # of the module (deepcopy for an EMA model, say) start without them.
        state = self.__dict__.copy()
        state.update(router_logits=None, _routing=None, _stats=None)
        return state

    def extra_repr(self) -> str:
        parts = [f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}",
                 f"activation={self.activation!r}, renormalize={self.renormalize}, scoring={self.scoring!r}"]
        if self.num_groups > 1:
            parts.append(f"num_groups={self.num_groups}, topk_groups={self.topk_groups}")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"routed_scaling_factor={self.routed_scaling_factor}")
        if self.routing != "token_choice":
            parts.append(f"routing={self.routing!r}")
        if self.capacity_factor is not None or self.expert_capacity is not None:
            parts.append(f"capacity_factor={self.capacity_factor}, expert_capacity={self.expert_capacity}, "
                         f"drop_policy={self.drop_policy!r}, capacity_scope={self.capacity_scope!r}")
        if self.weights_on_input:
            parts.append("weights_on_input=True")
        return ", ".join(parts)
