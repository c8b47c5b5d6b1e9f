// Argument checks of expert_ffn and expert_ffn_backward that need no tensor data, shared by the
// CPU and CUDA kernels so both fail with the same messages. The value checks on expert_offsets
// read its data: the CPU kernel runs them on the host (cpu/index_checks.h), the CUDA kernels on
// the device.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "activation.h"
#include "checks.h"

namespace sparsemoe {

struct FfnDims {
  int64_t N, d, E, f, F1;
};

inline void check_ffn_bias(const c10::optional<at::Tensor>& b, const char* name, const at::Tensor& x, int64_t E,
                           int64_t width, const char* what) {
  if (!b.has_value()) return;
  check_rank(*b, name, 2, what);
  check_same_device(x, "x_sorted", *b, name);
  check_dtype(*b, name, x.scalar_type());
  TORCH_CHECK(b->size(0) == E && b->size(1) == width, name, ": expected shape [", E, ", ", width, "] ", what,
              ", got ", shape_str(*b));
}

// Interleaved gate/up rows only mean something for an activation that has a gate and an up half;
// an ungated one is refused rather than silently reading the flag as a no-op, since passing it
// says the weights were laid out for a gated activation.
inline void check_gate_up_layout(const ActivationSpec& act, bool gate_up_interleaved) {
  TORCH_CHECK(!gate_up_interleaved || is_gated(act), "gate_up_interleaved: expected False for the ungated activation '",
              activation_name(act.kind), "' (only 'swiglu' and 'clamped_swiglu' have gate and up rows), got True");
}

inline FfnDims check_ffn_shapes(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w1,
                                const at::Tensor& w2, const ActivationSpec& act,
                                const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& b2,
                                bool gate_up_interleaved) {
  check_gate_up_layout(act, gate_up_interleaved);
  check_rank(x, "x_sorted", 2, "[N, d]");
  check_floating(x, "x_sorted");
  check_rank(offsets, "expert_offsets", 1, "[E + 1]");
  check_index(offsets, "expert_offsets");
  check_rank(w1, "w1", 3, "[E, F1, d]");
  check_rank(w2, "w2", 3, "[E, d, f]");
  for (auto [t, name] : {std::pair{&offsets, "expert_offsets"}, {&w1, "w1"}, {&w2, "w2"}}) {
    check_same_device(x, "x_sorted", *t, name);
  }
  check_dtype(w1, "w1", x.scalar_type());
  check_dtype(w2, "w2", x.scalar_type());
  FfnDims s{x.size(0), x.size(1), w1.size(0), w2.size(2), w1.size(1)};
  check_size(offsets, "expert_offsets", 0, s.E + 1, "E + 1, from w1");
  check_size(w1, "w1", 2, s.d, "d, the width of x_sorted");
  check_size(w2, "w2", 0, s.E, "E, from w1");
  check_size(w2, "w2", 1, s.d, "d, the width of x_sorted");
  check_size(w1, "w1", 1, is_gated(act) ? 2 * s.f : s.f,
             !is_gated(act)         ? "f, from w2"
             : gate_up_interleaved ? "2*f: alternating gate and up rows of a gated activation"
                                   : "2*f: gate and up rows of a gated activation");
  check_ffn_bias(b1, "b1", x, s.E, s.F1, "[E, F1], the bias of w1");
  check_ffn_bias(b2, "b2", x, s.E, s.d, "[E, d], the bias of w2");
  return s;
}

// The extra inputs of the backward: grad_y like x_sorted, hidden [N, F1].
inline void check_ffn_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& hidden,
                                      const FfnDims& s) {
  check_same_device(x, "x_sorted", grad_y, "grad_y");
  check_same_device(x, "x_sorted", hidden, "hidden");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y: expected shape ", shape_str(x),
              " (the shape of x_sorted), got ", shape_str(grad_y));
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == s.N && hidden.size(1) == s.F1,
              "hidden: expected shape [", s.N, ", ", s.F1, "], got ", shape_str(hidden));
  check_dtype(grad_y, "grad_y", x.scalar_type());
  check_dtype(hidden, "hidden", x.scalar_type());
}

inline at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace sparsemoe
