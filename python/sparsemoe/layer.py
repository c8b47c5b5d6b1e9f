"""MoELayer: a drop-in replacement for a transformer FFN block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .losses import load_balancing_loss


class MoELayer(nn.Module):
    """Top-k routed Mixture-of-Experts FFN: ``[..., d_model] -> [..., d_model]``.

    Parameters use the Hugging Face fused layout: ``router.weight [E, d_model]``,
    ``gate_up_proj [E, 2*d_ff, d_model]`` (gate rows first) for ``activation="swiglu"`` or
    ``[E, d_ff, d_model]`` for the plain MLP activations, and ``down_proj [E, d_model, d_ff]``.

    After each forward, ``aux_loss`` holds the load-balancing loss (a scalar tensor to scale
    and add to the training loss) and ``tokens_per_expert`` the int64 count of picks per
    expert; both stay on the device, so reading them is the caller's choice. ``aux_loss`` keeps
    the last forward's autograd graph alive until the next forward, as a returned loss would.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int,
                 activation: str = "swiglu", renormalize: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int in [1, num_experts={num_experts}], got {top_k!r}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ops.ACTIVATIONS}, got {activation!r}")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.activation, self.renormalize = activation, renormalize
        factory = {"device": device, "dtype": dtype}
        width = 2 * d_ff if activation in ops.GATED_ACTIVATIONS else d_ff
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, width, d_model, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.aux_loss: Tensor | None = None
        self.tokens_per_expert: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert is initialised like a pair of nn.Linear layers (uniform, +-1/sqrt(fan_in))."""
        self.router.reset_parameters()
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        w1, w2 = self.gate_up_proj, self.down_proj
        device_type = tokens.device.type
        if torch.is_autocast_enabled(device_type):
            # Custom ops are not autocast by torch: run the experts in the autocast dtype the
            # way nn.Linear would; routing math stays in float32 inside route.
            compute = torch.get_autocast_dtype(device_type)
            tokens, w1, w2 = tokens.to(compute), w1.to(compute), w2.to(compute)

        logits = F.linear(tokens, self.router.weight.to(tokens.dtype))
        weights, expert_ids = ops.route(logits, self.top_k, self.renormalize)
        x_sorted, offsets, slot = ops.dispatch(tokens, expert_ids, self.num_experts)
        y_sorted = ops.expert_ffn(x_sorted, offsets, w1, w2, self.activation)
        out = ops.combine(y_sorted, slot, weights)

        self.tokens_per_expert = offsets.diff()
        self.aux_loss = load_balancing_loss(logits, self.tokens_per_expert, self.top_k)
        return out.reshape(shape)

    def __getstate__(self):
        # The last forward's statistics hang on that step's autograd graph: copies and pickles
        # of the module (deepcopy for an EMA model, say) start without them.
        state = self.__dict__.copy()
        state["aux_loss"] = state["tokens_per_expert"] = None
        return state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, activation={self.activation!r}, renormalize={self.renormalize}")
