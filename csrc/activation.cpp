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

}  // namespace sparsemoe
