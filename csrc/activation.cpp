#include "activation.h"

#include <c10/util/Exception.h>

namespace sparsemoe {

ActivationSpec parse_activation(const std::string& name, double alpha, double limit) {
  TORCH_CHECK(limit > 0, "swiglu_limit: expected a positive clamp limit, got ", limit);
  if (name == "swiglu") return {Activation::SwiGLU, alpha, limit};
  if (name == "clamped_swiglu") return {Activation::ClampedSwiGLU, alpha, limit};
  if (name == "silu") return {Activation::SiLU, alpha, limit};
  if (name == "gelu") return {Activation::GELU, alpha, limit};
  if (name == "gelu_tanh") return {Activation::GELUTanh, alpha, limit};
  if (name == "relu") return {Activation::ReLU, alpha, limit};
  TORCH_CHECK(false, "activation: expected one of 'swiglu', 'clamped_swiglu', 'silu', 'gelu', 'gelu_tanh', "
              "'relu', got '", name, "'");
}

namespace {

struct ClampedHalves {
  at::Tensor gate, up;  // after clamping
};

ClampedHalves clamp_halves(const at::Tensor& h, const ActivationSpec& act) {
  const int64_t f = h.size(1) / 2;
  return {h.narrow(1, 0, f).clamp_max(act.limit), h.narrow(1, f, f).clamp(-act.limit, act.limit)};
}

}  // namespace

at::Tensor activation_forward(const at::Tensor& h, const ActivationSpec& act) {
  switch (act.kind) {
    case Activation::SwiGLU: {
      const int64_t f = h.size(1) / 2;
      return at::silu(h.narrow(1, 0, f)) * h.narrow(1, f, f);
    }
    case Activation::ClampedSwiGLU: {
      const ClampedHalves c = clamp_halves(h, act);
      return (c.up + 1) * (c.gate * at::sigmoid(c.gate * act.alpha));
    }
    case Activation::SiLU: return at::silu(h);
    case Activation::GELU: return at::gelu(h, "none");
    case Activation::GELUTanh: return at::gelu(h, "tanh");
    case Activation::ReLU: return at::relu(h);
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled activation");
}

at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, const ActivationSpec& act) {
  switch (act.kind) {
    case Activation::SwiGLU: {
      const int64_t f = h.size(1) / 2;
      const at::Tensor gate = h.narrow(1, 0, f);
      const at::Tensor up = h.narrow(1, f, f);
      return at::cat({at::silu_backward(grad_a * up, gate), grad_a * at::silu(gate)}, 1);
    }
    case Activation::ClampedSwiGLU: {
      // Clamps pass the gradient where the input lies inside the closed range, as torch.clamp.
      const int64_t f = h.size(1) / 2;
      const ClampedHalves c = clamp_halves(h, act);
      const at::Tensor sig = at::sigmoid(c.gate * act.alpha);
      const at::Tensor grad_up = grad_a * (c.gate * sig) * (h.narrow(1, f, f).abs() <= act.limit);
      const at::Tensor dglu = sig * (1 + c.gate * act.alpha * (1 - sig));
      const at::Tensor grad_gate = grad_a * (c.up + 1) * dglu * (h.narrow(1, 0, f) <= act.limit);
      return at::cat({grad_gate, grad_up}, 1);
    }
    case Activation::SiLU: return at::silu_backward(grad_a, h);
    case Activation::GELU: return at::gelu_backward(grad_a, h, "none");
    case Activation::GELUTanh: return at::gelu_backward(grad_a, h, "tanh");
    case Activation::ReLU: return at::threshold_backward(grad_a, h, 0);
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled activation");
}

}  // namespace sparsemoe
