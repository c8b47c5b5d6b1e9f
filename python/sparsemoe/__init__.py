"""sparsemoe: Mixture-of-Experts layers for PyTorch with C++/OpenMP kernels that train."""

import torch  # noqa: F401  (loads libtorch and its OpenMP runtime before the extension)

from . import _C  # noqa: F401  (registers torch.ops.sparsemoe.*)
from . import hf, ops, reference
from .convert import collect_moe_losses, load_moe, moe_aux_loss, moeify, save_moe
from .layer import MoELayer
from .losses import load_balancing_loss, router_probs, update_selection_bias, z_loss
from .routing import Router
from .stats import LayerRouting, RoutingCollapseWarning, routing_summary

__version__ = "0.1.0"
__all__ = ["LayerRouting", "MoELayer", "Router", "RoutingCollapseWarning", "collect_moe_losses", "hf",
           "load_balancing_loss", "load_moe", "moe_aux_loss", "moeify", "ops", "reference", "router_probs",
           "routing_summary", "save_moe", "update_selection_bias", "z_loss", "__version__"]
