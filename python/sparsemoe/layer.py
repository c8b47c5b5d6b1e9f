"""MoELayer: a drop-in replacement for a transformer FFN block."""

from __future__ import annotations

import inspect
import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed, ops
from .config import MoEConfig, check_option_names
from .packing import PackedWeights
from .losses import balance_loss_from_probs, router_probs, z_loss
from .routing import Router
from .shared_expert import SharedExpert


class MoELayer(nn.Module):
    """Routed Mixture-of-Experts FFN: ``[..., d_model] -> [..., d_model]``.

    ``MoELayer(d_model, d_ff, num_experts, top_k, activation="swiglu", renormalize=True, **options)``
    takes every field of :class:`sparsemoe.MoEConfig` as a keyword (see the README's option
    table for the settings that reproduce Mixtral, Qwen, OLMoE, DeepSeek-V3, GPT-OSS, Llama-4
    and Switch) and keeps it as ``layer.config``; ``MoELayer.from_config(cfg)`` builds from one.
    The options read as attributes too (``layer.top_k``).

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

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, activation: str = "swiglu",
                 renormalize: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **options):
        super().__init__()
        check_option_names(options, "MoELayer")
        cfg = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, activation=activation,
                        renormalize=renormalize, **options)
        self.config = cfg
        # With expert parallelism this rank holds experts [first, first + E / W) of the group's E.
        self._ep = distributed.ExpertShard.of(cfg)
        if self._ep is not None:
            self._ep.check_same_layer_on_every_rank(cfg)
        factory = {"device": device, "dtype": dtype}
        E, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
        E_here = E if self._ep is None else self._ep.num_local
        width = 2 * f if cfg.gated else f
        self.router = Router(d, E, cfg.router_bias, cfg.selection_bias, cfg.router_dtype, cfg.router_jitter, **factory)
        self.gate_up_proj = nn.Parameter(torch.empty(E_here, width, d, **factory))
        self.down_proj = nn.Parameter(torch.empty(E_here, d, f, **factory))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E_here, width, **factory)) if cfg.expert_bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(E_here, d, **factory)) if cfg.expert_bias else None
        self.shared_expert = (SharedExpert(d, cfg.shared_expert_d_ff, cfg.activation, cfg.swiglu_alpha,
                                           cfg.swiglu_limit, **factory) if cfg.shared_expert_d_ff else None)
        self.shared_expert_gate = nn.Linear(d, 1, bias=False, **factory) if cfg.shared_expert_gate else None
        self.router_logits: Tensor | None = None
        self._routing: tuple | None = None  # the last forward's (logits, ids, offsets, slot, padding_mask)
        self._stats: dict[str, Tensor] | None = None
        # The expert weights packed for the CPU micro-kernel (sparsemoe.packing; config.packed_weights).
        self._packed = PackedWeights()
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: MoEConfig, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> "MoELayer":
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config: expected a sparsemoe.MoEConfig, got {type(config).__name__}")
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)}, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Each expert is initialised like a pair of nn.Linear layers (uniform, +-1/sqrt(fan_in)).
        With expert parallelism every rank draws all experts' values and keeps its own, so that
        the same seed gives the same experts at any world size."""
        self.router.reset_parameters()
        for w, b, fan_in in ((self.gate_up_proj, self.gate_up_proj_bias, self.config.d_model),
                             (self.down_proj, self.down_proj_bias, self.config.d_ff)):
            for t in (w, b):
                if t is not None:
                    self._init_experts(t, 1 / math.sqrt(fan_in))
        for module in (self.shared_expert, self.shared_expert_gate):
            if module is not None:
                for child in module.modules():
                    if isinstance(child, nn.Linear):
                        child.reset_parameters()

    @torch.no_grad()
    def _init_experts(self, t: Tensor, bound: float) -> None:
        if self._ep is None:
            nn.init.uniform_(t, -bound, bound)
        else:
            full = t.new_empty((self.config.num_experts, *t.shape[1:])).uniform_(-bound, bound)
            t.copy_(self._ep.local_slice(full))

    def _token_groups(self, shape: torch.Size) -> int:
        # capacity_scope="sequence": every sequence of an input [..., S, d] has its own capacity.
        if self.config.capacity_scope == "sequence" and len(shape) >= 3:
            return max(math.prod(shape[:-2]), 1)
        return 1

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``padding_mask`` (``[...]``, True or 1 for real tokens) keeps padding out of the aux
        loss, the z-loss and the router entropy. Padding tokens are still routed, as in the models
        this layer reproduces, so they count in ``tokens_per_expert`` and ``dropped_fraction``
        and take capacity like any token."""
        cfg = self.config
        if cfg.batch_invariant and torch.compiler.is_compiling():
            # A compiled graph would run the experts unpacked (compiled code cannot keep the
            # packed cache): the invariant layer breaks the graph and runs eagerly.
            return self._eager_forward(x, padding_mask)
        if x.dim() == 0 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"x: expected shape [..., d_model={cfg.d_model}], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
            raise ValueError(f"padding_mask: expected shape {tuple(x.shape[:-1])} (x without its last dim), "
                             f"got {tuple(padding_mask.shape)}")
        device_type = x.device.type
        autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        if not autocast and x.dtype != self.gate_up_proj.dtype:
            raise ValueError(f"x: expected dtype {self.gate_up_proj.dtype} (the dtype of the layer's parameters; "
                             f"or run under torch.autocast), got {x.dtype}")
        shape = x.shape
        tokens = x.reshape(-1, cfg.d_model)
        if cfg.batch_invariant:
            self._check_batch_invariant(x, autocast)
        if self._runs_fused(tokens, autocast):
            return self._fused_forward(tokens, padding_mask).reshape(shape)
        linear = ops.fixed_order_linear if cfg.batch_invariant else F.linear
        # The router reads the input as given: under autocast its linear is autocast like any
        # nn.Linear, unless router_dtype asks for a wider dtype.
        logits = self.router(tokens, linear)
        w1, w2, b1, b2 = self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias
        if autocast:
            # Custom ops are not autocast by torch: run the experts in the autocast dtype the
            # way nn.Linear would; routing math stays in float32 inside route.
            compute = torch.get_autocast_dtype(device_type)
            tokens, w1, w2 = tokens.to(compute), w1.to(compute), w2.to(compute)
            b1, b2 = (None if b is None else b.to(compute) for b in (b1, b2))

        T, E = tokens.shape[0], cfg.num_experts
        groups = self._token_groups(shape)
        capacity = cfg.capacity(T // groups)
        if cfg.routing == "token_choice":
            weights, ids = ops.route(logits, cfg.top_k, renormalize=cfg.renormalize, scoring=cfg.scoring,
                                     selection_bias=self.router.selection_bias, num_groups=cfg.num_groups,
                                     topk_groups=cfg.topk_groups, scale=cfg.routed_scaling_factor)
            priority = weights.detach() if cfg.drop_policy == "probability" and capacity >= 0 else None
        else:
            # Expert choice: every token offers itself to every expert; each expert keeps its
            # best-scored tokens up to its capacity (top_k is the mean experts per token).
            weights, ids = ops.route(logits, E, renormalize=False, scoring=cfg.scoring,
                                     scale=cfg.routed_scaling_factor)
            priority = weights.detach()
        weights = weights.to(ops.opmath_dtype(tokens.dtype))
        experts = dict(activation=cfg.activation, b1=b1, b2=b2, swiglu_alpha=cfg.swiglu_alpha,
                       swiglu_limit=cfg.swiglu_limit)
        ep, pad = self._ep, self._ep is not None and cfg.pad_to_capacity
        # The rows the experts read: dispatch's copy of the tokens, or (Llama-4's weights on the
        # input, and the fixed buffers of pad_to_capacity) a plan whose rows scatter_rows writes.
        # dispatch with a zero-width x plans without copying anything.
        in_weights = weights if cfg.weights_on_input else None
        if cfg.weights_on_input or pad:
            plan, offsets, slot = ops.dispatch(tokens[:, :0], ids, E, capacity=capacity, priority=priority,
                                               token_groups=groups)
            rows = plan.shape[0]
            if pad:
                per_expert = capacity * groups
                slot, rows = distributed.padded_slots(ids, slot, offsets, per_expert), E * per_expert
            send = ops.scatter_rows(tokens, slot, in_weights, rows)
        else:
            send, offsets, slot = ops.dispatch(tokens, ids, E, capacity=capacity, priority=priority,
                                               token_groups=groups)
        if ep is None:
            packed = (self._packed.get((self.gate_up_proj, self.down_proj), w1, w2, cfg.activation, False,
                                       send.shape[0], always=cfg.batch_invariant) if cfg.packed_weights else None)
            y = ops.expert_ffn(send, offsets, w1, w2, packed=packed, **experts)
            shared = self._shared_expert_output(tokens)
        elif pad:
            shared = self._shared_expert_output(tokens)
            y = distributed.run_experts_padded(ep, send, per_expert, w1, w2, experts)
        else:
            exchange = distributed.start_count_exchange(ep, offsets)
            shared = self._shared_expert_output(tokens)  # while the counts are in flight
            y = distributed.run_experts(ep, send, offsets, exchange, w1, w2, experts)
        out = ops.combine(y, slot, None if cfg.weights_on_input else weights)
        if shared is not None:
            out = out + shared
        self._keep_routing(logits, ids, offsets, slot, padding_mask)
        return out.reshape(shape)

    def _keep_routing(self, logits: Tensor, ids: Tensor, offsets: Tensor, slot: Tensor,
                      padding_mask: Tensor | None) -> None:
        # Plain attributes, set in __init__: straight into __dict__ (nn.Module.__setattr__'s
        # parameter and submodule checks cost more than decoding's routing itself).
        vars(self).update(router_logits=logits, _routing=(logits, ids, offsets, slot, padding_mask), _stats=None)

    def _runs_fused(self, tokens: Tensor, autocast: bool) -> bool:
        """Whether this forward runs as one ops.moe_inference call: inference (grad mode off) on the
        CPU, dropless token choice on this process's experts, the router a plain linear in the
        input's dtype with no hooks of its own to run. At decoding sizes the separate ops' call
        overhead is as large as the experts' work."""
        cfg, router = self.config, self.router
        return (not torch.is_grad_enabled() and tokens.device.type == "cpu" and not autocast
                and self._ep is None and cfg.routing == "token_choice" and not cfg.weights_on_input
                and not cfg.batch_invariant and cfg.capacity(tokens.shape[0]) < 0
                and not torch.compiler.is_compiling() and type(router) is Router
                and router.weight.dtype == tokens.dtype and router.dtype_override in (None, tokens.dtype)
                and not (router.training and router.jitter > 0)
                and not (router._forward_hooks or router._forward_pre_hooks or _global_hooks()))

    def _fused_forward(self, tokens: Tensor, padding_mask: Tensor | None) -> Tensor:
        cfg, router = self.config, self.router
        w1, w2 = self.gate_up_proj, self.down_proj
        packed = (self._packed.get((w1, w2), w1, w2, cfg.activation, False, tokens.shape[0] * cfg.top_k)
                  if cfg.packed_weights else None)
        out, logits, ids, offsets, slot = ops.moe_inference(
            tokens, router.weight, router.bias, w1, w2, cfg.top_k, cfg.renormalize, cfg.scoring,
            router.selection_bias, cfg.num_groups, cfg.topk_groups, cfg.routed_scaling_factor, cfg.activation,
            self.gate_up_proj_bias, self.down_proj_bias, cfg.swiglu_alpha, cfg.swiglu_limit, packed)
        shared = self._shared_expert_output(tokens)
        if shared is not None:
            out = out + shared
        self._keep_routing(logits, ids, offsets, slot, padding_mask)
        return out

    @torch.compiler.disable
    def _eager_forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        return self.forward(x, padding_mask)

    def clear_packed_weights(self) -> None:
        """Drop the packed copy of the expert weights (it is rebuilt at the next CPU forward)."""
        self._packed.clear()

    @property
    def packed_weights_bytes(self) -> int:
        """Memory held by the packed copy of the expert weights (0 when there is none)."""
        return self._packed.nbytes

    def _shared_expert_output(self, tokens: Tensor) -> Tensor | None:
        if self.shared_expert is None:
            return None
        shared = self.shared_expert(tokens)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(tokens).to(shared.dtype)) * shared
        return shared

    def _check_batch_invariant(self, x: Tensor, autocast: bool) -> None:
        # The fixed-order reductions exist for float32 on oneDNN's CPU micro-kernel only; elsewhere
        # the layer would silently run batch-dependent GEMMs.
        where = ("a CPU tensor" if x.device.type != "cpu" else "float32" if x.dtype != torch.float32
                 else "no autocast" if autocast else None)
        if where is not None:
            got = {"a CPU tensor": x.device, "float32": x.dtype, "no autocast": "autocast enabled"}[where]
            raise ValueError(f"batch_invariant: expected {where} (float32 CPU micro-kernel reductions), got {got}")
        if not ops.packed_kernels_available():
            raise ValueError("batch_invariant: needs oneDNN's GEMM micro-kernel (torch's cpublas::brgemm, x86-64 "
                             "with AVX2 or newer), which this torch or CPU does not have")

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
        probs = router_probs(logits, self.config.scoring)  # once, for the aux loss and the entropy
        if self.config.routing == "token_choice":
            stats["aux_loss"] = balance_loss_from_probs(probs, ids, padding_mask)
            stats["dropped_fraction"] = (slot.numel() - offsets[-1].to(torch.float32)) / max(slot.numel(), 1)
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
        return ", ".join(f"{k}={v!r}" for k, v in self.config.non_defaults().items())


# The options read as attributes of the layer (layer.top_k is layer.config.top_k), except where
# the layer has a submodule of that name (shared_expert_gate is the gate's nn.Linear).
for _field in fields(MoEConfig):
    if _field.name != "shared_expert_gate":
        setattr(MoELayer, _field.name, property(lambda self, _name=_field.name: getattr(self.config, _name),
                                                doc=f"``config.{_field.name}`` (read-only)"))

# inspect.signature(MoELayer) and help() list every option, although they arrive as **options.
MoELayer.__init__.__signature__ = inspect.signature(MoELayer.__init__).replace(parameters=[
    *[p for p in inspect.signature(MoELayer.__init__).parameters.values() if p.kind != p.VAR_KEYWORD],
    *[inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
      for f in fields(MoEConfig) if f.name not in inspect.signature(MoELayer.__init__).parameters]])


def _global_hooks() -> bool:
    """Whether forward hooks registered for every module (nn.modules.module.register_module_forward_*)
    exist: the fused forward would skip them on the router."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """Every MoELayer of ``model`` with its module name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
