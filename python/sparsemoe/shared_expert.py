"""Always-on dense FFN added to the routed output (Qwen2-MoE, DeepSeek-V3, Llama-4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import reference


class SharedExpert(nn.Module):
    """``down(act(gate(x), up(x)))`` with Hugging Face's names (``gate_proj`` only for gated
    activations), so shared-expert weights load from HF checkpoints by name."""

    def __init__(self, d_model: int, d_ff: int, activation: str, gated: bool, swiglu_alpha: float,
                 swiglu_limit: float, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.activation, self.swiglu_alpha, self.swiglu_limit = activation, swiglu_alpha, swiglu_limit
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False, **factory) if gated else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=False, **factory)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        up = F.linear(x, self.up_proj.weight.to(x.dtype))
        if self.gate_proj is None:
            a = reference.activation(up, self.activation)
        else:
            gate = F.linear(x, self.gate_proj.weight.to(x.dtype))
            a = reference.gated_activation(gate, up, self.activation, self.swiglu_alpha, self.swiglu_limit)
        return F.linear(a, self.down_proj.weight.to(x.dtype))
