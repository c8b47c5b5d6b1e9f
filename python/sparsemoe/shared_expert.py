"""Always-on dense FFN added to the routed output (Qwen2-MoE, DeepSeek-V3, Llama-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GATED_ACTIVATIONS

_PLAIN = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


class SharedExpert(nn.Module):
    """``down(act(gate(x), up(x)))`` with Hugging Face's names (``gate_proj`` only for gated
    activations), so shared-expert weights load from HF checkpoints by name. The activation is
    the routed experts' one."""

    def __init__(self, d_model: int, d_ff: int, activation: str, swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.activation, self.swiglu_alpha, self.swiglu_limit = activation, swiglu_alpha, swiglu_limit
        gated = activation in GATED_ACTIVATIONS
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False, **factory) if gated else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=False, **factory)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        up = F.linear(x, self.up_proj.weight.to(x.dtype))
        if self.gate_proj is None:
            a = _PLAIN[self.activation](up)
        else:
            gate = F.linear(x, self.gate_proj.weight.to(x.dtype))
            if self.activation == "swiglu":
                a = F.silu(gate) * up
            else:  # clamped_swiglu (GPT-OSS)
                gate = gate.clamp(max=self.swiglu_limit)
                up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
                a = (up + 1) * (gate * torch.sigmoid(self.swiglu_alpha * gate))  # GPT-OSS's order
        return F.linear(a, self.down_proj.weight.to(x.dtype))
