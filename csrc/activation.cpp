#include "activation.h"

#include <c10/util/Exception.h>

namespace sparsemoe {

Activation parse_activation(const std::string& name) {
  if (name == "swiglu") return Activation::SwiGLU;
  if (name == "silu") return Activation::SiLU;
  if (name == "gelu") return Activation::GELU;
  if (name == "gelu_tanh") return Activation::GELUTanh;
  if (name == "relu") return Activation::ReLU;
  TORCH_CHECK(false, "activation: expected one of 'swiglu', 'silu', 'gelu', 'gelu_tanh', 'relu', got '",
              name, "'");
}

at::Tensor activation_forward(const at::Tensor& h, Activation act) {
  switch (act) {
    case Activation::SwiGLU: {
      const int64_t f = h.size(1) / 2;
      return at::silu(h.narrow(1, 0, f)) * h.narrow(1, f, f);
    }
    case Activation::SiLU: return at::silu(h);
    case Activation::GELU: return at::gelu(h, "none");
    case Activation::GELUTanh: return at::gelu(h, "tanh");
    case Activation::ReLU: return at::relu(h);
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled activation");
}

at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, Activation act) {
  switch (act) {
    case Activation::SwiGLU: {
      const int64_t f = h.size(1) / 2;
      const at::Tensor gate = h.narrow(1, 0, f);
      const at::Tensor up = h.narrow(1, f, f);
      return at::cat({at::silu_backward(grad_a * up, gate), grad_a * at::silu(gate)}, 1);
    }
    case Activation::SiLU: return at::silu_backward(grad_a, h);
    case Activation::GELU: return at::gelu_backward(grad_a, h, "none");
    case Activation::GELUTanh: return at::gelu_backward(grad_a, h, "tanh");
    case Activation::ReLU: return at::threshold_backward(grad_a, h, 0);
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled activation");
}

}  // namespace sparsemoe
