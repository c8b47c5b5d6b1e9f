"""Router losses. Everything stays on the device: nothing here reads a value to the host."""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import opmath_dtype


def load_balancing_loss(router_logits: Tensor, tokens_per_expert: Tensor, top_k: int) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is expert e's share of the T*k routed picks (``tokens_per_expert / (T*k)``) and
    ``P_e`` the mean router probability of expert e over the T tokens, so a perfectly
    balanced router scores exactly 1.0 whatever k is (the Switch / Megatron normalisation;
    Hugging Face's Mixtral loss is k times this). Only ``P_e`` carries gradient.
    """
    T, E = router_logits.shape
    acc = opmath_dtype(router_logits.dtype)
    probs = torch.softmax(router_logits.to(acc), dim=-1)
    denom = max(T, 1)
    f = tokens_per_expert.to(acc) / (denom * top_k)
    p = probs.sum(0) / denom
    return E * torch.dot(f, p)
