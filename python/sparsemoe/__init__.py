"""sparsemoe: Mixture-of-Experts layers for PyTorch with C++/OpenMP kernels that train."""

import torch  # noqa: F401  (loads libtorch and its OpenMP runtime before the extension)

from . import _C  # noqa: F401  (registers torch.ops.sparsemoe.*)
from . import hf, ops, reference
from .checkpoint import load_moe, save_moe
from .config import MoEConfig
from .convert import moeify
from .layer import MoELayer, moe_layers
from .losses import collect_moe_losses, load_balancing_loss, moe_aux_loss, router_probs, update_selection_bias, z_loss
from .routing import Router
from .stats import LayerRouting, RoutingCollapseWarning, routing_summary

__version__ = "0.1.0"
__all__ = ["LayerRouting", "MoEConfig", "MoELayer", "Router", "RoutingCollapseWarning", "collect_moe_losses", "hf",
           "load_balancing_loss", "load_moe", "moe_aux_loss", "moe_layers", "moeify", "ops", "reference",
           "router_probs", "routing_summary", "save_moe", "update_selection_bias", "z_loss", "__version__"]
