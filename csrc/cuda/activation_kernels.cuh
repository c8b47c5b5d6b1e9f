// Expert activations on the GPU: one fused elementwise pass per direction for every activation.
//   forward:  hidden [N, F1] (+ b1 of the row's expert, written back) -> a [N, f]
//   backward: (grad_a [N, f], hidden [N, F1]) -> grad_h [N, F1] and the recomputed a [N, f]
// The math follows torch.nn.functional's CUDA definitions (silu, gelu erf / tanh, relu with
// threshold_backward at 0) in opmath, and csrc/activation.cpp for the gated forms, so CPU and
// CUDA agree up to rounding. One warp owns one row: the row's expert (needed for the bias) is
// found once per warp, and the gate and up columns of a gated row are read by the same lane.
// Gate/up columns are the [gate | up] halves of a hidden row, or with `interleaved` (GPT-OSS)
// alternate: gate column j at hidden column 2j, up column j at 2j + 1 (GateUp below).
// Rows at or past offsets[E] (capacity padding) get zeros. `offsets` is always the checked copy
// of an ExpertSchedule (grouped_gemm.cuh), never the caller's tensor.
#pragma once

#include <limits>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>

#include "activation.h"
#include "cuda/device_utils.cuh"
#include "cuda/grouped_gemm.cuh"

namespace sparsemoe {
namespace {

constexpr int kWarp = cuda::kWarpSize;
constexpr int kRowsPerBlock = 8;  // warps per block in the row-wise kernels

// The activation as the kernels see it: the kind plus the clamped-SwiGLU parameters in opmath.
template <typename acc_t>
struct ActParams {
  Activation kind;
  acc_t alpha, limit;
};

// PyTorch clamps and compares a tensor against the limit in the tensor's own dtype (the scalar
// is rounded to it), and multiplies by alpha in opmath.
template <typename scalar_t>
ActParams<at::opmath_type<scalar_t>> act_params(const ActivationSpec& act) {
  using acc_t = at::opmath_type<scalar_t>;
  return {act.kind, static_cast<acc_t>(act.alpha), static_cast<acc_t>(static_cast<scalar_t>(act.limit))};
}

using cuda::exp_op;
using cuda::is_nan;
__device__ __forceinline__ float erf_of(float x) { return erff(x); }
__device__ __forceinline__ double erf_of(double x) { return erf(x); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }

// Constants of torch's gelu kernels, evaluated in double then rounded to opmath as torch does.
constexpr double kSqrtHalf = 0.70710678118654752440;     // M_SQRT1_2
constexpr double kTwoOverSqrtPi = 1.12837916709551257390;  // M_2_SQRTPI
constexpr double kSqrtTwo = 1.41421356237309504880;      // M_SQRT2
constexpr double kGeluTanhKappa = 0.044715;

template <typename T>
__device__ __forceinline__ T sigmoid_of(T x) { return T(1) / (T(1) + exp_op(-x)); }

template <typename T>
__device__ __forceinline__ T silu_of(T x) { return x / (T(1) + exp_op(-x)); }

template <typename T>
__device__ __forceinline__ T silu_grad(T g, T x) {
  const T s = sigmoid_of(x);
  return g * s * (T(1) + x * (T(1) - s));
}

template <typename T>
__device__ __forceinline__ T gelu_of(T x) {
  return x * T(0.5) * (T(1) + erf_of(x * T(kSqrtHalf)));
}

template <typename T>
__device__ __forceinline__ T gelu_grad(T g, T x) {
  const T beta = T(kTwoOverSqrtPi * kSqrtHalf * 0.5);
  const T cdf = T(0.5) * (T(1) + erf_of(x * T(kSqrtHalf)));
  const T pdf = exp_op(T(-0.5) * x * x) * beta;
  return g * (cdf + x * pdf);
}

template <typename T>
__device__ __forceinline__ T gelu_tanh_of(T x) {
  const T beta = T(kSqrtTwo * kTwoOverSqrtPi * 0.5);
  const T inner = beta * (x + T(kGeluTanhKappa) * x * x * x);
  return T(0.5) * x * (T(1) + tanh_of(inner));
}

template <typename T>
__device__ __forceinline__ T gelu_tanh_grad(T g, T x) {
  const T beta = T(kSqrtTwo * kTwoOverSqrtPi * 0.5);
  const T kappa = T(kGeluTanhKappa);
  // x^2 bounded at the largest finite value: where tanh has saturated for a finite x, sech^2 is
  // exactly 0 and the second term must be 0, not 0 * inf (at x = +-inf it stays NaN).
  const T x_sq = fmin(x * x, std::numeric_limits<T>::max());
  const T inner = beta * (x + kappa * x_sq * x);
  const T t = tanh_of(inner);
  const T left = T(0.5) * x;
  const T right = T(1) + t;
  const T inner_grad = beta * (T(1) + T(3) * kappa * x_sq);
  return g * (T(0.5) * right + left * (T(1) - t * t) * inner_grad);
}

// torch.relu keeps NaN; threshold_backward(grad, x, 0) passes the gradient only where x > 0.
template <typename T>
__device__ __forceinline__ T relu_of(T x) { return is_nan(x) ? x : (x > T(0) ? x : T(0)); }

// torch.clamp semantics: NaN stays NaN (comparisons with NaN are false).
template <typename T>
__device__ __forceinline__ T clamp_above(T x, T hi) { return x > hi ? hi : x; }
template <typename T>
__device__ __forceinline__ T clamp_both(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Single-input activations (silu, gelu, gelu_tanh, relu).
template <typename T>
__device__ __forceinline__ T plain_forward(const ActParams<T>& p, T h) {
  switch (p.kind) {
    case Activation::SiLU: return silu_of(h);
    case Activation::GELU: return gelu_of(h);
    case Activation::GELUTanh: return gelu_tanh_of(h);
    default: return relu_of(h);
  }
}

template <typename T>
__device__ __forceinline__ T plain_backward(const ActParams<T>& p, T g, T h) {
  switch (p.kind) {
    case Activation::SiLU: return silu_grad(g, h);
    case Activation::GELU: return gelu_grad(g, h);
    case Activation::GELUTanh: return gelu_tanh_grad(g, h);
    default: return h <= T(0) ? T(0) : g;
  }
}

// Gated activations: swiglu = silu(gate) * up; clamped_swiglu (GPT-OSS) as in activation.h.
template <typename T>
__device__ __forceinline__ T gated_forward(const ActParams<T>& p, T gate, T up) {
  if (p.kind == Activation::SwiGLU) return silu_of(gate) * up;
  const T g = clamp_above(gate, p.limit);
  const T u = clamp_both(up, -p.limit, p.limit);
  return (u + T(1)) * (g * sigmoid_of(g * p.alpha));
}

// The clamps pass the gradient where the input lies inside the closed range and give exactly 0
// outside it (a select, as torch.clamp's backward and the CPU kernels: a non-finite gradient
// outside the range is dropped, not multiplied by 0 into NaN).
template <typename T>
__device__ __forceinline__ void gated_backward(const ActParams<T>& p, T grad, T gate, T up, T& grad_gate,
                                               T& grad_up, T& out) {
  if (p.kind == Activation::SwiGLU) {
    const T s = silu_of(gate);
    grad_gate = silu_grad(grad * up, gate);
    grad_up = grad * s;
    out = s * up;
    return;
  }
  const T g = clamp_above(gate, p.limit);
  const T u = clamp_both(up, -p.limit, p.limit);
  const T sig = sigmoid_of(g * p.alpha);
  const T glu = g * sig;
  grad_up = fabs(up) <= p.limit ? grad * glu : T(0);
  // d glu / d gate, exactly 0 once the sigmoid has underflowed for a finite gate (alpha * g may
  // be -inf there, and the product 0 * inf).
  const T dglu = sig == T(0) && isfinite(g) ? T(0) : sig * (T(1) + g * p.alpha * (T(1) - sig));
  grad_gate = gate <= p.limit ? grad * (u + T(1)) * dglu : T(0);
  out = (u + T(1)) * glu;
}

// Hidden (and b1) columns of gate and up column j of a gated row.
struct GateUp {
  int64_t f;
  bool interleaved;
  __device__ __forceinline__ int64_t gate(int64_t j) const { return interleaved ? 2 * j : j; }
  __device__ __forceinline__ int64_t up(int64_t j) const { return interleaved ? 2 * j + 1 : f + j; }
};

// hidden [N, F1] -> a [N, f]. With b1, hidden rows of experts get b1[e] added in place (the
// saved pre-activation includes the bias) and the activation reads the rounded sum, as the CPU
// path does. zero_padding_hidden clears hidden's padding rows (left unspecified by the library
// GEMM); a's padding rows are always 0.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    activation_forward_kernel(scalar_t* __restrict__ hidden, const scalar_t* __restrict__ b1,
                              const int64_t* __restrict__ offsets, int64_t E, int64_t N, int64_t f, int64_t F1,
                              bool gated, GateUp cols, bool zero_padding_hidden,
                              ActParams<at::opmath_type<scalar_t>> p, scalar_t* __restrict__ a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= N) return;
  scalar_t* h = hidden + row * F1;
  scalar_t* out = a + row * f;
  if (row >= offsets[E]) {
    for (int64_t j = lane; j < f; j += kWarp) out[j] = scalar_t(0);
    if (zero_padding_hidden) {
      for (int64_t j = lane; j < F1; j += kWarp) h[j] = scalar_t(0);
    }
    return;
  }
  const scalar_t* bias = b1 != nullptr ? b1 + last_at_or_below(offsets, E, row) * F1 : nullptr;
  for (int64_t j = lane; j < f; j += kWarp) {
    if (gated) {
      const int64_t jg = cols.gate(j), ju = cols.up(j);
      scalar_t gate = h[jg], up = h[ju];
      if (bias != nullptr) {
        gate = static_cast<scalar_t>(static_cast<acc_t>(gate) + static_cast<acc_t>(bias[jg]));
        up = static_cast<scalar_t>(static_cast<acc_t>(up) + static_cast<acc_t>(bias[ju]));
        h[jg] = gate;
        h[ju] = up;
      }
      out[j] = static_cast<scalar_t>(gated_forward(p, static_cast<acc_t>(gate), static_cast<acc_t>(up)));
    } else {
      scalar_t v = h[j];
      if (bias != nullptr) {
        v = static_cast<scalar_t>(static_cast<acc_t>(v) + static_cast<acc_t>(bias[j]));
        h[j] = v;
      }
      out[j] = static_cast<scalar_t>(plain_forward(p, static_cast<acc_t>(v)));
    }
  }
}

// (grad_a [N, f], hidden [N, F1]) -> grad_h [N, F1] and a [N, f] (recomputed for grad_w2).
// Only expert rows of grad_a are read; padding rows of both outputs are 0.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    activation_backward_kernel(const scalar_t* __restrict__ grad_a, const scalar_t* __restrict__ hidden,
                               const int64_t* __restrict__ offsets, int64_t E, int64_t N, int64_t f, int64_t F1,
                               bool gated, GateUp cols, ActParams<at::opmath_type<scalar_t>> p,
                               scalar_t* __restrict__ grad_h, scalar_t* __restrict__ a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= N) return;
  scalar_t* gh = grad_h + row * F1;
  scalar_t* out = a + row * f;
  if (row >= offsets[E]) {
    for (int64_t j = lane; j < f; j += kWarp) out[j] = scalar_t(0);
    for (int64_t j = lane; j < F1; j += kWarp) gh[j] = scalar_t(0);
    return;
  }
  const scalar_t* h = hidden + row * F1;
  const scalar_t* g = grad_a + row * f;
  for (int64_t j = lane; j < f; j += kWarp) {
    const acc_t grad = static_cast<acc_t>(g[j]);
    if (gated) {
      const int64_t jg = cols.gate(j), ju = cols.up(j);
      acc_t grad_gate, grad_up, value;
      gated_backward(p, grad, static_cast<acc_t>(h[jg]), static_cast<acc_t>(h[ju]), grad_gate, grad_up, value);
      gh[jg] = static_cast<scalar_t>(grad_gate);
      gh[ju] = static_cast<scalar_t>(grad_up);
      out[j] = static_cast<scalar_t>(value);
    } else {
      const acc_t x = static_cast<acc_t>(h[j]);
      gh[j] = static_cast<scalar_t>(plain_backward(p, grad, x));
      out[j] = static_cast<scalar_t>(plain_forward(p, x));
    }
  }
}

inline int64_t row_blocks(int64_t N) { return (N + kRowsPerBlock - 1) / kRowsPerBlock; }

template <typename scalar_t>
void activation_forward_rows(at::Tensor& hidden, const at::Tensor& b1, const ExpertSchedule& s,
                             const ActivationSpec& act, bool interleaved, bool zero_padding_hidden, at::Tensor& a) {
  const int64_t N = hidden.size(0), F1 = hidden.size(1), f = a.size(1);
  if (N == 0) return;
  activation_forward_kernel<scalar_t>
      <<<grid_blocks(row_blocks(N), "x_sorted rows"), kWarp * kRowsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          hidden.data_ptr<scalar_t>(), b1.defined() ? b1.data_ptr<scalar_t>() : nullptr,
          s.offsets(), s.E, N, f, F1, is_gated(act), GateUp{f, interleaved}, zero_padding_hidden,
          act_params<scalar_t>(act), a.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void activation_backward_rows(const at::Tensor& grad_a, const at::Tensor& hidden, const ExpertSchedule& s,
                              const ActivationSpec& act, bool interleaved, at::Tensor& grad_h, at::Tensor& a) {
  const int64_t N = hidden.size(0), F1 = hidden.size(1), f = a.size(1);
  if (N == 0) return;
  activation_backward_kernel<scalar_t>
      <<<grid_blocks(row_blocks(N), "x_sorted rows"), kWarp * kRowsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_a.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(), s.offsets(), s.E, N, f, F1,
          is_gated(act), GateUp{f, interleaved}, act_params<scalar_t>(act), grad_h.data_ptr<scalar_t>(),
          a.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sparsemoe
