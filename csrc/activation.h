// Expert activations, parsed once from the schema's string into a spec. The kernels that apply
// them (cpu/activation_kernels.h, cuda/activation_kernels.cuh) follow torch.nn.functional's
// definitions, which the reference uses.
#pragma once

#include <string>

namespace sparsemoe {

enum class Activation { SwiGLU, ClampedSwiGLU, SiLU, GELU, GELUTanh, ReLU };

struct ActivationSpec {
  Activation kind;
  // ClampedSwiGLU (GPT-OSS): gate clamped above at limit, up clamped to [-limit, limit],
  // out = (up + 1) * gate * sigmoid(alpha * gate).
  double alpha = 1.702;
  double limit = 7.0;
};

ActivationSpec parse_activation(const std::string& name, double alpha, double limit);

// The schema's name of an activation kind ('swiglu', 'gelu', ...), for messages.
const char* activation_name(Activation kind);

// Gated activations read [gate | up] halves of the hidden row, so the first expert projection
// has twice the hidden width.
inline bool is_gated(const ActivationSpec& act) {
  return act.kind == Activation::SwiGLU || act.kind == Activation::ClampedSwiGLU;
}

}  // namespace sparsemoe
