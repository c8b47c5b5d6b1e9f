"""Routing health across a model's MoE layers. This is where statistics reach the host: call it
when you log, not every step."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .layer import moe_layers


@dataclass
class LayerRouting:
    name: str
    load: list[float]          # share of the kept picks per expert (sums to 1)
    dropped_fraction: float
    router_entropy: float      # nats; log(E) is a uniform router
    aux_loss: float
    z_loss: float


class RoutingCollapseWarning(UserWarning):
    """An expert gets (almost) no tokens, or one expert takes most of them."""


def routing_summary(model: nn.Module, idle_share: float = 0.1, dominant_share: float = 0.5,
                    warn: bool = True) -> list[LayerRouting]:
    """Summarise the last forward of every MoELayer in ``model``.

    Warns (RoutingCollapseWarning) when an expert's load is below ``idle_share`` of the uniform
    share 1/E, or when one expert takes more than ``dominant_share`` of all picks (only when
    E > 1 / dominant_share, so a 2-expert layer is not flagged for an even split).
    """
    summaries = []
    for name, module in moe_layers(model):
        if module.tokens_per_expert is None:
            continue
        counts = module.tokens_per_expert.detach().double().cpu()
        total = counts.sum().item()
        load = (counts / total if total > 0 else torch.zeros_like(counts)).tolist()
        s = LayerRouting(name or "<root>", load, *(float(getattr(module, stat).detach()) for stat in
                                                   ("dropped_fraction", "router_entropy", "aux_loss", "z_loss")))
        summaries.append(s)
        E = len(load)
        if not warn or total == 0:
            continue
        idle = [e for e, share in enumerate(load) if share < idle_share / E]
        if idle:
            warnings.warn(f"{s.name}: experts {idle} received less than {idle_share:g} of a uniform share of "
                          f"tokens (routing collapse?)", RoutingCollapseWarning, stacklevel=2)
        top = max(range(E), key=load.__getitem__)
        if E * dominant_share > 1 and load[top] > dominant_share:
            warnings.warn(f"{s.name}: expert {top} took {load[top]:.0%} of all picks (routing collapse?)",
                          RoutingCollapseWarning, stacklevel=2)
    return summaries
