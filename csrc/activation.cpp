#include "activation.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace sparsemoe {

ActivationSpec parse_activation(const std::string& name, double alpha, double limit) {
  if (name == "swiglu") return {Activation::SwiGLU, alpha, limit};
  if (name == "clamped_swiglu") {
    // Only the clamped activation reads the limit (and the alpha).
    TORCH_CHECK(limit > 0, "swiglu_limit: expected a positive clamp limit, got ", limit);
    TORCH_CHECK(std::isfinite(alpha), "swiglu_alpha: expected a finite number, got ", alpha);
    return {Activation::ClampedSwiGLU, alpha, limit};
  }
  if (name == "silu") return {Activation::SiLU, alpha, limit};
  if (name == "gelu") return {Activation::GELU, alpha, limit};
  if (name == "gelu_tanh") return {Activation::GELUTanh, alpha, limit};
  if (name == "relu") return {Activation::ReLU, alpha, limit};
  TORCH_CHECK(false, "activation: expected one of 'swiglu', 'clamped_swiglu', 'silu', 'gelu', 'gelu_tanh', "
              "'relu', got '", name, "'");
}

const char* activation_name(Activation kind) {
  switch (kind) {
    case Activation::SwiGLU: return "swiglu";
    case Activation::ClampedSwiGLU: return "clamped_swiglu";
    case Activation::SiLU: return "silu";
    case Activation::GELU: return "gelu";
    case Activation::GELUTanh: return "gelu_tanh";
    case Activation::ReLU: return "relu";
  }
  return "unknown";
}

}  // namespace sparsemoe
