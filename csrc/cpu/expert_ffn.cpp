// Expert FFNs over contiguous expert segments of the expert-ordered buffer, forward and
// backward. Each GEMM runs through at::mm_out (MKL / oneDNN with AVX-512 or AVX512-BF16)
// on views of the segment, so no rows are copied.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "activation.h"
#include "checks.h"
#include "cpu/index_checks.h"

namespace sparsemoe {
namespace {

struct FfnDims {
  int64_t N, d, E, f, F1;
  int64_t M;  // rows owned by experts (offsets[E]); rows M..N are capacity padding
};

void check_bias(const c10::optional<at::Tensor>& b, const char* name, const at::Tensor& x, int64_t E,
                int64_t width, const char* what) {
  if (!b.has_value()) return;
  check_rank(*b, name, 2, what);
  check_same_device(x, "x_sorted", *b, name);
  check_dtype(*b, name, x.scalar_type());
  TORCH_CHECK(b->size(0) == E && b->size(1) == width, name, ": expected shape [", E, ", ", width, "] ", what,
              ", got ", shape_str(*b));
}

FfnDims check_ffn_args(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w1,
                       const at::Tensor& w2, const ActivationSpec& act, const c10::optional<at::Tensor>& b1,
                       const c10::optional<at::Tensor>& b2) {
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
  FfnDims s{x.size(0), x.size(1), w1.size(0), w2.size(2), w1.size(1), 0};
  check_size(offsets, "expert_offsets", 0, s.E + 1, "E + 1, from w1");
  check_size(w1, "w1", 2, s.d, "d, the width of x_sorted");
  check_size(w2, "w2", 0, s.E, "E, from w1");
  check_size(w2, "w2", 1, s.d, "d, the width of x_sorted");
  check_size(w1, "w1", 1, is_gated(act) ? 2 * s.f : s.f,
             is_gated(act) ? "2*f: gate and up rows of a gated activation" : "f, from w2");
  check_bias(b1, "b1", x, s.E, s.F1, "[E, F1], the bias of w1");
  check_bias(b2, "b2", x, s.E, s.d, "[E, d], the bias of w2");
  s.M = check_offsets_values(offsets, s.N);
  return s;
}

// at::mm_out into a view of a larger tensor (the views are rvalues, mm_out wants an lvalue).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// out = bias + a @ b (bias broadcast over rows), or a @ b without a bias.
void linear_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(out, bias, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void sum_rows_into(at::Tensor out, const at::Tensor& a) { at::sum_out(out, a, 0); }

// Calls fn(e, first_row, rows) for each expert that owns at least one row.
template <typename Fn>
void for_each_segment(const at::Tensor& offsets, Fn&& fn) {
  const int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t e = 0; e + 1 < offsets.numel(); ++e) {
    if (o[e + 1] > o[e]) fn(e, o[e], o[e + 1] - o[e]);
  }
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> expert_ffn_cpu(const at::Tensor& x_in, const at::Tensor& offsets_in,
                                                  const at::Tensor& w1_in, const at::Tensor& w2_in,
                                                  c10::string_view activation,
                                                  const c10::optional<at::Tensor>& b1_in,
                                                  const c10::optional<at::Tensor>& b2_in, double swiglu_alpha,
                                                  double swiglu_limit) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const at::Tensor offsets = offsets_in.contiguous();
  const FfnDims s = check_ffn_args(x_in, offsets, w1_in, w2_in, act, b1_in, b2_in);
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor b1 = contiguous_or_undefined(b1_in), b2 = contiguous_or_undefined(b2_in);
  at::Tensor hidden = at::empty({s.N, s.F1}, x.options());
  at::Tensor y = at::empty({s.N, s.d}, x.options());
  for_each_segment(offsets, [&](int64_t e, int64_t r0, int64_t n) {
    linear_into(hidden.narrow(0, r0, n), x.narrow(0, r0, n), w1[e].t(), b1.defined() ? b1[e] : at::Tensor());
  });
  const at::Tensor a = activation_forward(hidden.narrow(0, 0, s.M), act);
  for_each_segment(offsets, [&](int64_t e, int64_t r0, int64_t n) {
    linear_into(y.narrow(0, r0, n), a.narrow(0, r0, n), w2[e].t(), b2.defined() ? b2[e] : at::Tensor());
  });
  // Capacity padding rows belong to no expert: they output zero.
  hidden.narrow(0, s.M, s.N - s.M).zero_();
  y.narrow(0, s.M, s.N - s.M).zero_();
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& offsets_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in,
    c10::string_view activation, double swiglu_alpha, double swiglu_limit, bool bias_grads) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const at::Tensor offsets = offsets_in.contiguous();
  const FfnDims s = check_ffn_args(x_in, offsets, w1_in, w2_in, act, c10::nullopt, c10::nullopt);
  check_same_device(x_in, "x_sorted", grad_y_in, "grad_y");
  check_same_device(x_in, "x_sorted", hidden_in, "hidden");
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "grad_y: expected shape ", shape_str(x_in),
              " (the shape of x_sorted), got ", shape_str(grad_y_in));
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.size(0) == s.N && hidden_in.size(1) == s.F1,
              "hidden: expected shape [", s.N, ", ", s.F1, "], got ", shape_str(hidden_in));
  check_dtype(grad_y_in, "grad_y", x_in.scalar_type());
  check_dtype(hidden_in, "hidden", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor gy = grad_y_in.contiguous(), hidden = hidden_in.narrow(0, 0, s.M).contiguous();

  const at::Tensor a = activation_forward(hidden, act);
  at::Tensor grad_a = at::empty({s.M, s.f}, x.options());
  // Zeros, not empty: experts that own no rows must report an exactly zero gradient.
  at::Tensor grad_w1 = at::zeros_like(w1), grad_w2 = at::zeros_like(w2);
  at::Tensor grad_b1 = at::zeros({bias_grads ? s.E : 0, s.F1}, x.options());
  at::Tensor grad_b2 = at::zeros({bias_grads ? s.E : 0, s.d}, x.options());
  for_each_segment(offsets, [&](int64_t e, int64_t r0, int64_t n) {
    const at::Tensor gy_e = gy.narrow(0, r0, n);
    mm_into(grad_a.narrow(0, r0, n), gy_e, w2[e]);
    mm_into(grad_w2[e], gy_e.t(), a.narrow(0, r0, n));
    if (bias_grads) sum_rows_into(grad_b2[e], gy_e);
  });
  const at::Tensor grad_h = activation_backward(grad_a, hidden, act);
  at::Tensor grad_x = at::empty({s.N, s.d}, x.options());
  grad_x.narrow(0, s.M, s.N - s.M).zero_();  // padding rows feed no expert
  for_each_segment(offsets, [&](int64_t e, int64_t r0, int64_t n) {
    const at::Tensor gh_e = grad_h.narrow(0, r0, n);
    mm_into(grad_x.narrow(0, r0, n), gh_e, w1[e]);
    mm_into(grad_w1[e], gh_e.t(), x.narrow(0, r0, n));
    if (bias_grads) sum_rows_into(grad_b1[e], gh_e);
  });
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) {
  m.impl("expert_ffn", &expert_ffn_cpu);
  m.impl("expert_ffn_backward", &expert_ffn_backward_cpu);
}

}  // namespace sparsemoe
