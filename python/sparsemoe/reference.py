"""Pure-PyTorch definitions of every sparsemoe op and of the layer: written to be read,
not to be fast. The tests hold the kernels to these.
"""

from __future__ import annotations

from collections.abc import Mapping

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
        per = E // num_groups
        best = torch.gather(grouped, -1, expert_order(grouped.reshape(-1, per)).view(T, num_groups, per)[..., :2])
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


def check_gate_up_layout(activation: str, gate_up_interleaved: bool) -> None:
    """Interleaved gate/up rows need an activation with a gate and an up half."""
    if gate_up_interleaved and activation not in ("swiglu", "clamped_swiglu"):
        raise ValueError(f"gate_up_interleaved: expected False for the ungated activation '{activation}' "
                         f"(only 'swiglu' and 'clamped_swiglu' have gate and up rows), got True")


def apply_activation(h: Tensor, name: str, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                     gate_up_interleaved: bool = False) -> Tensor:
    """act(h); a gated activation reads gate and up as h's [gate | up] halves, or with
    gate_up_interleaved as its even and odd columns (GPT-OSS: ``h[..., ::2], h[..., 1::2]``)."""
    if name in ("swiglu", "clamped_swiglu"):
        if gate_up_interleaved:
            gate, up = h[..., ::2], h[..., 1::2]
        else:
            gate, up = h.chunk(2, dim=-1)
        return gated_activation(gate, up, name, swiglu_alpha, swiglu_limit)
    check_gate_up_layout(name, gate_up_interleaved)
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name](h)


def expert_ffn(x_sorted: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor,
               activation: str = "swiglu", b1: Tensor | None = None, b2: Tensor | None = None,
               swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
               gate_up_interleaved: bool = False) -> Tensor:
    """y[r] = act(x[r] @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e] for the rows r of expert e; rows past
    expert_offsets[E] (capacity padding) are 0. With gate_up_interleaved the gate and up rows of
    w1 and b1 alternate (row 2c gate c, row 2c+1 up c) instead of forming [gate | up] halves."""
    check_gate_up_layout(activation, gate_up_interleaved)  # also when no expert has rows
    y = x_sorted.new_zeros(x_sorted.shape[0], w2.shape[1])
    for e in range(w1.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi > lo:
            h = x_sorted[lo:hi] @ w1[e].T
            if b1 is not None:
                h = h + b1[e]
            out = apply_activation(h, activation, swiglu_alpha, swiglu_limit, gate_up_interleaved) @ w2[e].T
            if b2 is not None:
                out = out + b2[e]
            y[lo:hi] = out
    return y


def combine(rows: Tensor, slot: Tensor, weights: Tensor | None = None) -> Tensor:
    acc = opmath_dtype(rows.dtype)
    if rows.shape[0] == 0:  # every pick dropped (capacity 0): nothing to gather
        return rows.new_zeros(slot.shape[0], rows.shape[1])
    picked = rows[slot.clamp(min=0)].to(acc)
    if weights is not None:
        picked = picked * weights.unsqueeze(-1)
    # A dropped pick adds nothing, whatever its row holds (NaN and inf included).
    picked = torch.where((slot >= 0).unsqueeze(-1), picked, torch.zeros((), dtype=acc, device=rows.device))
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
    if b.shape[0] == 0:
        return a.new_zeros(slot.shape, dtype=acc)
    dots = (a.to(acc).unsqueeze(1) * b[slot.clamp(min=0)].to(acc)).sum(-1)
    return torch.where(slot >= 0, dots, torch.zeros((), dtype=acc, device=a.device))


def moe_inference(x: Tensor, router_weight: Tensor, router_bias: Tensor | None, w1: Tensor, w2: Tensor, k: int,
                  renormalize: bool = True, scoring: str = "softmax", selection_bias: Tensor | None = None,
                  num_groups: int = 1, topk_groups: int = 1, scale: float = 1.0, activation: str = "swiglu",
                  b1: Tensor | None = None, b2: Tensor | None = None, swiglu_alpha: float = 1.702,
                  swiglu_limit: float = 7.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The router linear, route, dropless dispatch, expert_ffn and combine, one after the other."""
    logits = F.linear(x, router_weight, router_bias)
    weights, ids = route(logits, k, renormalize, scoring, selection_bias, num_groups, topk_groups, scale)
    rows, offsets, slot = dispatch(x, ids, w1.shape[0])
    y = expert_ffn(rows, offsets, w1, w2, activation, b1, b2, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    return combine(y, slot, weights), logits, ids, offsets, slot


def load_balancing_loss(logits: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard aux loss E * sum_e f_e * P_e, f_e = share of the T*k picks, P_e = mean prob."""
    probs = torch.softmax(logits.float(), dim=-1)
    f = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float() / expert_ids.numel()
    return num_experts * (f * probs.mean(0)).sum()


def moe_forward(x: Tensor, params: Mapping[str, Tensor], config, *, padding_mask: Tensor | None = None,
                return_stats: bool = False):
    """The whole MoELayer as a Hugging Face style eager loop: route, then per expert select its
    tokens, run the FFN, scale, add; plus the shared expert.

    ``params`` holds the layer's tensors under its state-dict names (``router.weight``,
    ``router.bias``, ``router.selection_bias``, ``gate_up_proj``, ``down_proj`` and their
    ``_bias``, ``shared_expert.{gate,up,down}_proj.weight``, ``shared_expert_gate.weight``) and
    ``config`` is its MoEConfig. Routing and capacity are written here independently of
    route/dispatch: torch.topk over experts (token choice) or over tokens (expert choice), and
    per (expert, token group) a plain list of the picks kept.
    With return_stats, also returns the layer's statistics as a dict.
    """
    c = config
    top_k, act, swiglu_alpha, swiglu_limit = c.top_k, c.activation, c.swiglu_alpha, c.swiglu_limit
    router_weight, gate_up_proj, down_proj = params["router.weight"], params["gate_up_proj"], params["down_proj"]
    router_bias = params["router.bias"] if c.router_bias else None
    selection_bias = params["router.selection_bias"] if c.selection_bias else None
    gate_up_proj_bias = params["gate_up_proj_bias"] if c.expert_bias else None
    down_proj_bias = params["down_proj_bias"] if c.expert_bias else None
    gated = act in ("swiglu", "clamped_swiglu")
    shared_up_proj = params["shared_expert.up_proj.weight"] if c.shared_expert_d_ff else None
    shared_down_proj = params["shared_expert.down_proj.weight"] if c.shared_expert_d_ff else None
    shared_gate_proj = params["shared_expert.gate_proj.weight"] if c.shared_expert_d_ff and gated else None
    shared_expert_gate = params["shared_expert_gate.weight"] if c.shared_expert_gate else None

    shape = x.shape
    d = shape[-1]
    x = x.reshape(-1, d)
    T, E = x.shape[0], gate_up_proj.shape[0]
    acc = opmath_dtype(x.dtype)

    # Router logits (optionally in a wider dtype).
    rd = c.router_dtype or x.dtype
    logits = F.linear(x.to(rd), router_weight.to(rd), None if router_bias is None else router_bias.to(rd))

    # Token groups for the capacity: whole batch, or each sequence of an input [..., S, d].
    groups = 1
    if c.capacity_scope == "sequence" and len(shape) >= 3:
        for n in shape[:-2]:
            groups *= n
    per_group = T // groups if groups else 0
    group_of = torch.arange(T, device=x.device) // max(per_group, 1)  # each token's group

    # picks[e] = list of (token, weight of the pick) that expert e processes.
    picks: list[tuple[Tensor, Tensor]] = []
    if c.routing == "token_choice":
        weights, ids = _oracle_route(logits, top_k, c.renormalize, c.scoring, selection_bias, c.num_groups,
                                     c.topk_groups, c.routed_scaling_factor)
        capacity = _oracle_capacity(per_group, top_k, E, c.capacity_factor, c.expert_capacity)
        for e in range(E):
            tok, pick = torch.nonzero(ids == e, as_tuple=True)  # token order
            w = weights[tok, pick]
            if capacity >= 0:
                kept = []
                for g in range(groups):
                    in_group = torch.nonzero(group_of[tok] == g).squeeze(1)
                    if c.drop_policy == "probability":
                        # highest weight first, ties to the earlier token (stable sort)
                        in_group = in_group[torch.sort(-w[in_group].detach(), stable=True).indices]
                    kept.append(in_group[:capacity])
                kept = torch.sort(torch.cat(kept)).values if kept else tok.new_zeros(0)
                tok, w = tok[kept], w[kept]
            picks.append((tok, w))
        ids_for_loss = ids
    else:
        # Expert choice: each expert takes its top-C tokens of every group by score.
        if c.scoring == "sigmoid":
            s = torch.sigmoid(logits.to(acc))
        else:
            s = torch.softmax(logits.to(acc), dim=-1)
        s = s * c.routed_scaling_factor
        capacity = _oracle_capacity(per_group, top_k, E, c.capacity_factor or 1.0, c.expert_capacity)
        for e in range(E):
            toks = []
            for g in range(groups):
                col = s[g * per_group:(g + 1) * per_group, e].detach()
                # torch.topk over the token dimension with ties to the earlier token.
                top = torch.sort(col, descending=True, stable=True).indices[:capacity]
                toks.append(g * per_group + top)
            tok = torch.sort(torch.cat(toks)).values if toks else torch.zeros(0, dtype=torch.long, device=x.device)
            picks.append((tok, s[tok, e]))
        ids_for_loss = None

    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    kept_per_expert = []
    for e, (tok, w) in enumerate(picks):
        kept_per_expert.append(tok.numel())
        if tok.numel() == 0:
            continue
        w = w.to(acc)
        xe = x[tok]
        if c.weights_on_input:
            xe = (xe.to(acc) * w[:, None]).to(x.dtype)
        h = xe @ gate_up_proj[e].T
        if gate_up_proj_bias is not None:
            h = h + gate_up_proj_bias[e]
        y = apply_activation(h, act, swiglu_alpha, swiglu_limit) @ down_proj[e].T
        if down_proj_bias is not None:
            y = y + down_proj_bias[e]
        y = y.to(acc) if c.weights_on_input else y.to(acc) * w[:, None]
        out = out.index_add(0, tok, y)
    out = out.to(x.dtype)

    if shared_up_proj is not None:
        up = x @ shared_up_proj.to(x.dtype).T
        if shared_gate_proj is not None:
            a = gated_activation(x @ shared_gate_proj.to(x.dtype).T, up, act, swiglu_alpha, swiglu_limit)
        else:
            a = apply_activation(up, act)
        shared = a @ shared_down_proj.to(x.dtype).T
        if shared_expert_gate is not None:
            shared = torch.sigmoid(x @ shared_expert_gate.to(x.dtype).T) * shared
        out = out + shared
    out = out.reshape(shape)
    if not return_stats:
        return out

    tokens_per_expert = torch.tensor(kept_per_expert, dtype=torch.int64, device=x.device)
    if c.routing == "token_choice":
        aux = _oracle_aux_loss(logits, ids_for_loss, c.scoring, padding_mask)
        dropped = (T * top_k - tokens_per_expert.sum().item()) / max(T * top_k, 1)
    else:
        aux = logits.new_zeros((), dtype=torch.float32)
        covered = torch.zeros(T, dtype=torch.bool, device=x.device)
        for tok, _ in picks:
            covered[tok] = True
        dropped = 1 - covered.float().mean().item() if T else 0.0
    stats = {"router_logits": logits, "aux_loss": aux, "z_loss": _oracle_z_loss(logits, padding_mask),
             "tokens_per_expert": tokens_per_expert, "dropped_fraction": dropped,
             "router_entropy": _oracle_entropy(logits, c.scoring, padding_mask)}
    return out, stats


def _oracle_route(logits: Tensor, k: int, renormalize: bool, scoring: str, selection_bias: Tensor | None,
                  num_groups: int, topk_groups: int, scale: float) -> tuple[Tensor, Tensor]:
    """Token-choice routing the way the model code writes it (torch.topk; ties unspecified)."""
    z = logits.to(opmath_dtype(logits.dtype))
    s = {"softmax": lambda: torch.softmax(z, -1), "sigmoid": lambda: torch.sigmoid(z),
         "softmax_topk": lambda: z}[scoring]()
    choice = s.detach()
    if selection_bias is not None:
        choice = choice + selection_bias.to(choice.dtype)
    if num_groups > 1:
        T, E = choice.shape
        size = E // num_groups
        grouped = choice.view(T, num_groups, size)
        group_score = grouped.topk(min(2, size), dim=-1).values.sum(-1)
        best_groups = group_score.topk(topk_groups, dim=-1).indices
        allowed = torch.zeros(T, num_groups, dtype=torch.bool, device=choice.device)
        allowed[torch.arange(T, device=choice.device)[:, None], best_groups] = True
        choice = choice.masked_fill(~allowed.repeat_interleave(size, dim=1), -torch.inf)
    ids = choice.topk(k, dim=-1).indices
    if scoring == "softmax_topk":
        weights = torch.softmax(z.gather(1, ids), dim=-1)
    else:
        weights = s.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def _oracle_capacity(tokens_per_group: int, k: int, E: int, factor: float | None, fixed: int | None) -> int:
    if fixed is not None:
        return fixed
    if factor is None:
        return -1
    return int(torch.tensor(factor * tokens_per_group * k / E, dtype=torch.float64).ceil())


def _oracle_probs(logits: Tensor, scoring: str) -> Tensor:
    z = logits.to(opmath_dtype(logits.dtype))
    if scoring == "sigmoid":
        s = torch.sigmoid(z)
        return s / s.sum(-1, keepdim=True)
    return torch.softmax(z, dim=-1)


def _oracle_mask(logits: Tensor, padding_mask: Tensor | None) -> Tensor:
    if padding_mask is None:
        return torch.ones(logits.shape[0], dtype=opmath_dtype(logits.dtype), device=logits.device)
    return padding_mask.reshape(-1).to(opmath_dtype(logits.dtype))


def _oracle_aux_loss(logits: Tensor, ids: Tensor, scoring: str, padding_mask: Tensor | None) -> Tensor:
    """E * sum_e f_e * P_e over the real tokens: f_e = share of their picks, P_e = mean prob."""
    E, k = logits.shape[1], ids.shape[1]
    m = _oracle_mask(logits, padding_mask)
    n = m.sum().clamp_min(1)  # no real token: the losses are 0
    chosen = F.one_hot(ids, E).to(m.dtype).sum(1)  # [T, E]
    f = (chosen * m[:, None]).sum(0) / (n * k)
    p = (_oracle_probs(logits, scoring) * m[:, None]).sum(0) / n
    return E * (f * p).sum()


def _oracle_z_loss(logits: Tensor, padding_mask: Tensor | None) -> Tensor:
    m = _oracle_mask(logits, padding_mask)
    lse = torch.logsumexp(logits.to(m.dtype), dim=-1)
    return (lse ** 2 * m).sum() / m.sum().clamp_min(1)


def _oracle_entropy(logits: Tensor, scoring: str, padding_mask: Tensor | None) -> Tensor:
    m = _oracle_mask(logits, padding_mask)
    p = _oracle_probs(logits.detach(), scoring)
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return (h * m).sum() / m.sum().clamp_min(1)
