"""The router module: scores every expert for every token. Which experts are picked and with
what weights is the route op's job (every scheme is an option of that one op)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import update_selection_bias


class Router(nn.Module):
    """``logits = x @ weight.T (+ bias)``, optionally in a wider dtype and with training jitter.

    ``selection_bias`` (a float32 buffer, when enabled) is DeepSeek-V3's
    ``e_score_correction_bias``: route adds it to the scores only to choose experts, and
    :meth:`update_selection_bias` moves it towards balance without any aux loss.
    """

    def __init__(self, d_model: int, num_experts: int, bias: bool = False, selection_bias: bool = False,
                 dtype_override: torch.dtype | None = None, jitter: float = 0.0, device=None, dtype=None):
        super().__init__()
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"router_jitter: expected 0 <= jitter < 1, got {jitter!r}")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, **factory)) if bias else None
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.selection_bias = None
        self.dtype_override, self.jitter = dtype_override, jitter
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation; the selection bias starts at zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)
        if self.selection_bias is not None:
            self.selection_bias.zero_()

    def forward(self, x: Tensor, linear=F.linear) -> Tensor:
        """``linear`` computes the logits (``F.linear``'s signature; a batch-invariant layer passes
        ``ops.fixed_order_linear``)."""
        dtype = self.dtype_override or x.dtype
        x = x.to(dtype)
        if self.training and self.jitter > 0:
            # Switch Transformer's multiplicative jitter, on the router's input only.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.dtype_override is None:
            return linear(x, self.weight.to(dtype), bias)
        # An explicit router dtype wins over autocast (DeepSeek-V3 and Switch route in float32).
        with torch.autocast(x.device.type, enabled=False):
            return linear(x, self.weight.to(dtype), bias)

    def _apply(self, fn, recurse=True):
        # module.to(bfloat16) must not round the selection bias: its update steps (about 1e-3)
        # vanish in bfloat16 once the bias grows. It follows the module's device only.
        bias = self._buffers.get("selection_bias")
        super()._apply(fn, recurse)
        moved = self._buffers.get("selection_bias")
        if bias is not None and moved is not None and moved.dtype != bias.dtype:
            # Undo the cast: from the unrounded values, unless they have no data (meta device).
            source = moved if bias.is_meta else bias
            self._buffers["selection_bias"] = source.to(device=moved.device, dtype=bias.dtype)
        return self

    def update_selection_bias(self, tokens_per_expert: Tensor, rate: float) -> None:
        if self.selection_bias is None:
            raise RuntimeError("update_selection_bias: this router was built without selection_bias=True")
        update_selection_bias(self.selection_bias, tokens_per_expert, rate)

    def extra_repr(self) -> str:
        return (f"d_model={self.weight.shape[1]}, num_experts={self.weight.shape[0]}, bias={self.bias is not None}, "
                f"selection_bias={self.selection_bias is not None}, dtype_override={self.dtype_override}, "
                f"jitter={self.jitter}")
