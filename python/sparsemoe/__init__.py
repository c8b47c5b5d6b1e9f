"""sparsemoe: Mixture-of-Experts layers for PyTorch with C++/OpenMP kernels that train."""

import torch  # noqa: F401  (loads libtorch and its OpenMP runtime before the extension)

from . import _C  # noqa: F401  (registers torch.ops.sparsemoe.*)
from . import hf, ops, reference
from .layer import MoELayer
from .losses import load_balancing_loss, router_probs, update_selection_bias, z_loss
from .routing import Router
from .stats import LayerRouting, RoutingCollapseWarning, routing_summary

__version__ = "0.1.0"
__all__ = ["LayerRouting", "MoELayer", "Router", "RoutingCollapseWarning", "hf", "load_balancing_loss", "ops",
           "reference", "router_probs", "routing_summary", "update_selection_bias", "z_loss", "__version__"]
