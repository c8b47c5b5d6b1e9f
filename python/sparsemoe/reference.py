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


SCORINGS = ("softmax", "sigmoid", "softmax_topk")


def router_scores(logits: Tensor, scoring: str) -> Tensor:
    """Per-expert scores in opmath: softmax or sigmoid of the logits, or the logits themselves
    for "softmax_topk" (whose softmax runs over the k picked logits only)."""
    x = logits.to(opmath_dtype(logits.dtype))
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    return x


def route(logits: Tensor, k: int, renormalize: bool = True, scoring: str = "softmax",
          selection_bias: Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
          scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Token-choice routing: every scheme is one path with options.

    scores s = softmax / sigmoid / identity (softmax_topk) of the logits; choice c = s + bias
    decides which experts are picked (the bias never reaches the weights; with no bias and no
    groups c ranks as the logits, the same order); with num_groups > 1
    only the topk_groups groups with the largest sum of their two best c are eligible; the k
    best eligible experts are picked (ties to the lower index, NaN last). Weights are the
    picked scores (softmax_topk: the softmax of the picked logits), divided by their sum
    (+1e-20) when renormalize, times scale.
    """
    s = router_scores(logits, scoring)
    if selection_bias is None and num_groups == 1:
        # Scores are monotone in the logits: ranking the logits picks the same experts and keeps
        # them apart where softmax underflows or sigmoid saturates (and keeps NaN rows ranked).
        c = logits.to(s.dtype)
    else:
        c = s if selection_bias is None else s + selection_bias.to(s.dtype)
    T, E = c.shape
    if num_groups > 1:
        grouped = c.view(T, num_groups, E // num_groups)
        best = torch.gather(grouped, -1, expert_order(grouped.reshape(-1, E // num_groups))
                            .view(T, num_groups, -1)[..., :2])
        group_score = best.sum(-1)
        keep = expert_order(group_score)[:, :topk_groups]
        allowed = torch.zeros(T, num_groups, dtype=torch.bool, device=c.device)
        allowed.scatter_(1, keep, True)
        allowed = allowed.repeat_interleave(E // num_groups, dim=1)
        rank = expert_order(c)
        # A stable sort on "not eligible" moves the eligible experts first, keeping their order.
        eligible_first = torch.sort((~allowed.gather(1, rank)).to(torch.int8), dim=1, stable=True).indices
        ids = rank.gather(1, eligible_first)[:, :k]
    else:
        ids = expert_order(c)[:, :k]
    if scoring == "softmax_topk":
        weights = torch.softmax(torch.gather(s, -1, ids), dim=-1)
    else:
        weights = torch.gather(s, -1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def dispatch(x: Tensor, expert_ids: Tensor, num_experts: int, capacity: int = -1,
             priority: Tensor | None = None, token_groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the (token, pick) pairs by expert, keeping at most `capacity` per expert and group.

    Tokens form token_groups equal contiguous groups. Within an (expert, group), picks are
    kept by priority (higher first; None means token position), ties to the earlier token.
    Kept rows stay in token order inside each expert; dropped picks get slot -1. The buffer has
    N = T*k rows (dropless) or min(T*k, E*groups*capacity); rows past offsets[E] are zero.
    """
    T, k = expert_ids.shape
    E = num_experts
    flat = expert_ids.reshape(-1)
    keep = torch.ones(T * k, dtype=torch.bool, device=x.device)
    N = T * k
    if capacity >= 0:
        N = min(T * k, E * token_groups * capacity)
        group = torch.arange(T, device=x.device).repeat_interleave(k) // max(T // token_groups, 1)
        pos = torch.arange(T * k, device=x.device)
        if priority is None:
            key = -pos.double()
        else:
            key = priority.reshape(-1).double()
        # Rank the picks of each (expert, group) by key (desc), then by position (asc).
        order = torch.sort(-key, stable=True).indices
        bucket = (flat * token_groups + group)[order]
        order = order[torch.sort(bucket, stable=True).indices]
        bucket_sorted = (flat * token_groups + group)[order]
        starts = torch.searchsorted(bucket_sorted, bucket_sorted, right=False)
        rank_in_bucket = torch.arange(T * k, device=x.device) - starts
        keep[order] = rank_in_bucket < capacity
    kept = torch.nonzero(keep).squeeze(1)
    order = kept[torch.sort(flat[kept], stable=True).indices]  # expert-major, token order inside
    x_sorted = x.new_zeros(N, x.shape[1])
    x_sorted[: order.numel()] = x[order // k]
    counts = torch.bincount(flat[kept], minlength=E)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    slot = torch.full_like(flat, -1)
    slot[order] = torch.arange(order.numel(), device=x.device)
    return x_sorted, offsets, slot.view(T, k)


def gated_activation(gate: Tensor, up: Tensor, name: str, swiglu_alpha: float = 1.702,
                     swiglu_limit: float = 7.0) -> Tensor:
    if name == "swiglu":
        return F.silu(gate) * up
    # clamped_swiglu (GPT-OSS): gate clamped above, up clamped both sides, x*sigmoid(alpha*x).
    gate = gate.clamp(max=swiglu_limit)
    up = up.clamp(-swiglu_limit, swiglu_limit)
    return (up + 1) * gate * torch.sigmoid(swiglu_alpha * gate)


def activation(h: Tensor, name: str, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
    if name in ("swiglu", "clamped_swiglu"):
        gate, up = h.chunk(2, dim=-1)
        return gated_activation(gate, up, name, swiglu_alpha, swiglu_limit)
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name](h)


def expert_ffn(x_sorted: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor,
               act: str = "swiglu", b1: Tensor | None = None, b2: Tensor | None = None,
               swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
    """y[r] = act(x[r] @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e] for the rows r of expert e; rows past
    expert_offsets[E] (capacity padding) are 0."""
    y = x_sorted.new_zeros(x_sorted.shape[0], w2.shape[1])
    for e in range(w1.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            h = x_sorted[lo:hi] @ w1[e].T
            if b1 is not None:
                h = h + b1[e]
            out = activation(h, act, swiglu_alpha, swiglu_limit) @ w2[e].T
            if b2 is not None:
                out = out + b2[e]
            y[lo:hi] = out
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
