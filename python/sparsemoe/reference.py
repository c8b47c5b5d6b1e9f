"""Pure-PyTorch definitions of every sparsemoe op and of the layer: written to be read,
not to be fast. The tests hold the kernels to these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expert_order(logits: Tensor) -> Tensor:
    """Experts of each row from best to worst: larger logit first, NaN last, ties by index."""
    key = torch.nan_to_num(logits, nan=-torch.inf)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    is_nan = torch.gather(logits.isnan(), -1, order)
    # A stable sort on the NaN flag moves NaNs behind every number (-inf included).
    return torch.gather(order, -1, torch.sort(is_nan.to(torch.int8), dim=-1, stable=True).indices)


def route(logits: Tensor, k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    x = logits.to(opmath_dtype(logits.dtype))
    probs = torch.softmax(x, dim=-1)
    ids = expert_order(x)[:, :k]
    weights = torch.gather(probs, -1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def dispatch(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    # Row-major flattening is (token, pick) order, so a stable sort keeps token order per expert.
    order = torch.sort(flat, stable=True).indices
    x_sorted = x[order // k]
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    slot = torch.empty_like(flat)
    slot[order] = torch.arange(T * k, device=x.device)
    return x_sorted, offsets, slot.view(T, k)


def activation(h: Tensor, name: str) -> Tensor:
    if name == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name](h)


def expert_ffn(x_sorted: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor,
               act: str = "swiglu") -> Tensor:
    y = x_sorted.new_zeros(x_sorted.shape[0], w2.shape[1])
    for e in range(w1.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            y[lo:hi] = activation(x_sorted[lo:hi] @ w1[e].T, act) @ w2[e].T
    return y


def combine(rows: Tensor, slot: Tensor, weights: Tensor | None = None) -> Tensor:
    acc = opmath_dtype(rows.dtype)
    picked = rows[slot.clamp(min=0)].to(acc) * (slot >= 0).unsqueeze(-1)
    if weights is not None:
        picked = picked * weights.unsqueeze(-1)
    return picked.sum(1).to(rows.dtype)


def scatter_rows(src: Tensor, slot: Tensor, weights: Tensor | None, num_rows: int) -> Tensor:
    out = src.new_zeros(num_rows, src.shape[1])
    t, j = torch.nonzero(slot >= 0, as_tuple=True)
    vals = src[t].to(opmath_dtype(src.dtype))
    if weights is not None:
        vals = vals * weights[t, j].unsqueeze(-1)
    out[slot[t, j]] = vals.to(src.dtype)
    return out


def slot_dot(a: Tensor, b: Tensor, slot: Tensor) -> Tensor:
    acc = opmath_dtype(a.dtype)
    dots = (a.to(acc).unsqueeze(1) * b[slot.clamp(min=0)].to(acc)).sum(-1)
    return dots * (slot >= 0)


def load_balancing_loss(logits: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard aux loss E * sum_e f_e * P_e, f_e = share of the T*k picks, P_e = mean prob."""
    probs = torch.softmax(logits.float(), dim=-1)
    f = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float() / expert_ids.numel()
    return num_experts * (f * probs.mean(0)).sum()


def moe_forward(x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                top_k: int, act: str = "swiglu", renormalize: bool = True) -> Tensor:
    """The Hugging Face eager loop: per expert, select its tokens, run the FFN, scale, add."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    logits = F.linear(x, router_weight)
    weights, ids = route(logits, top_k, renormalize)
    out = torch.zeros(x.shape, dtype=opmath_dtype(x.dtype), device=x.device)
    for e in range(gate_up_proj.shape[0]):
        tok, pick = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = activation(x[tok] @ gate_up_proj[e].T, act) @ down_proj[e].T
        out.index_add_(0, tok, y.to(out.dtype) * weights[tok, pick, None])
    return out.to(x.dtype).reshape(shape)
