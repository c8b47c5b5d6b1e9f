"""Router losses, the aux-loss-free bias update and the model-wide loss helpers. Nothing here
reads a value to the host."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import opmath_dtype


def router_probs(router_logits: Tensor, scoring: str = "softmax") -> Tensor:
    """Each token's routing distribution over experts, in opmath: the softmax of the logits, or
    for sigmoid routers the sigmoid scores normalised to sum to 1 (DeepSeek-V3's affinities)."""
    x = router_logits.to(opmath_dtype(router_logits.dtype))
    if scoring == "sigmoid":
        s = torch.sigmoid(x)
        return s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return torch.softmax(x, dim=-1)


def _token_mask(router_logits: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.numel() != router_logits.shape[0]:
        raise ValueError(f"attention_mask: expected {router_logits.shape[0]} entries (one per token), "
                         f"got shape {tuple(attention_mask.shape)}")
    return attention_mask.reshape(-1).to(opmath_dtype(router_logits.dtype))


def load_balancing_loss(router_logits: Tensor, expert_ids: Tensor, attention_mask: Tensor | None = None,
                        scoring: str = "softmax") -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is expert e's share of the routed picks (before any capacity drop, as in Switch)
    and ``P_e`` the mean routing probability of expert e. Tokens where ``attention_mask`` is 0
    (padding) count in neither. A perfectly balanced router scores exactly 1.0 whatever k is
    (the Switch / Megatron normalisation; Hugging Face's Mixtral-style loss is k times this).
    Only ``P_e`` carries gradient.
    """
    return balance_loss_from_probs(router_probs(router_logits, scoring), expert_ids, attention_mask)


def balance_loss_from_probs(probs: Tensor, expert_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """load_balancing_loss from routing probabilities already at hand ([T, E], opmath)."""
    T, E = probs.shape
    k = expert_ids.shape[1]
    mask = _token_mask(probs, attention_mask)
    weight = torch.ones(T, dtype=probs.dtype, device=probs.device) if mask is None else mask
    tokens = weight.sum().clamp_min(1)
    counts = torch.zeros(E, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, expert_ids.reshape(-1), weight.repeat_interleave(k))
    f = counts / (tokens * k)
    p = (probs * weight.unsqueeze(1)).sum(0) / tokens
    return E * torch.dot(f, p)


def z_loss(router_logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): the mean over tokens of logsumexp(logits)^2; padding excluded."""
    lse = torch.logsumexp(router_logits.to(opmath_dtype(router_logits.dtype)), dim=-1)
    mask = _token_mask(router_logits, attention_mask)
    if mask is None:
        return lse.square().mean() if lse.numel() else lse.new_zeros(())
    return (lse.square() * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def update_selection_bias(bias: Tensor, tokens_per_expert: Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): raise the selection bias of experts below the mean
    load by ``rate`` and lower it for those above; experts exactly at the mean keep theirs."""
    load = tokens_per_expert.to(bias.dtype)
    bias.add_(rate * torch.sign(load.mean() - load))


def collect_moe_losses(model: nn.Module) -> tuple[Tensor, Tensor]:
    """``(aux, z)``: the sums of ``aux_loss`` and ``z_loss`` over every MoELayer of ``model``
    from its last forward (layers not run since construction are skipped)."""
    from .layer import moe_layers  # the layer imports this module

    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MoELayer")
    ran = [m for _, m in layers if m.aux_loss is not None]
    if not ran:
        raise RuntimeError("collect_moe_losses: no MoELayer has run a forward yet")
    aux = torch.stack([m.aux_loss.float() for m in ran]).sum()
    z = torch.stack([m.z_loss.float() for m in ran]).sum()
    return aux, z


def moe_aux_loss(model: nn.Module, aux_coef: float = 1e-2, z_coef: float = 1e-3) -> Tensor:
    """``aux_coef * Σ aux_loss + z_coef * Σ z_loss`` over the MoE layers' last forward:
    ``loss = task_loss + moe_aux_loss(model)``."""
    aux, z = collect_moe_losses(model)
    return aux_coef * aux + z_coef * z
