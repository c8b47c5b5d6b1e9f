// Expert activations. Parsed once from the schema's string into an enum, then applied with
// ATen's vectorised pointwise kernels so forward and backward use the same definitions as
// torch.nn.functional (which the reference uses).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace sparsemoe {

enum class Activation { SwiGLU, SiLU, GELU, GELUTanh, ReLU };

Activation parse_activation(const std::string& name);

// Gated activations read [gate | up] halves of the hidden row, so the first expert projection
// has twice the hidden width.
inline bool is_gated(Activation act) { return act == Activation::SwiGLU; }

// h: [N, F1] pre-activation (F1 = 2f when gated, else f) -> [N, f].
at::Tensor activation_forward(const at::Tensor& h, Activation act);

// grad_a: [N, f], h: [N, F1] -> grad_h [N, F1].
at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, Activation act);

}  // namespace sparsemoe
