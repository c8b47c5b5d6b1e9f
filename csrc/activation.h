// Expert activations. Parsed once from the schema's string into a spec, then applied with
// ATen's vectorised pointwise kernels so forward and backward use the same definitions as
// torch.nn.functional (which the reference uses).
#pragma once

#include <ATen/ATen.h>

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

// Gated activations read [gate | up] halves of the hidden row, so the first expert projection
// has twice the hidden width.
inline bool is_gated(const ActivationSpec& act) {
  return act.kind == Activation::SwiGLU || act.kind == Activation::ClampedSwiGLU;
}

// h: [N, F1] pre-activation (F1 = 2f when gated, else f) -> [N, f].
at::Tensor activation_forward(const at::Tensor& h, const ActivationSpec& act);

// grad_a: [N, f], h: [N, F1] -> grad_h [N, F1].
at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, const ActivationSpec& act);

}  // namespace sparsemoe
