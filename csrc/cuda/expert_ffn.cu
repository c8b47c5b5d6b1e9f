// Expert FFNs over contiguous expert segments on CUDA, forward and backward, with no host
// synchronisation: expert_offsets stays on the device and every output size is static, so the
// ops can be captured in a CUDA graph.
//
// Why each piece is the way it is:
// - bfloat16 on sm90 / sm100 with 16-byte aligned rows (d and f multiples of 8) uses
//   at::_grouped_mm, whose CUTLASS kernel reads the int32 group ends from the device. x @ W^T
//   and the input gradients are its 2D x 3D form; the weight gradients are its 2D x 2D form
//   with the groups along the reduction (row) dimension, called with the first operand
//   column-major and the second row-major, the one layout for which it accepts empty groups.
//   Only under exactly these conditions: for other dtypes or GPUs torch falls back to a loop
//   that copies the offsets to the host, which would break the no-sync contract.
// - Everything else (float32, float64, float16, and bfloat16 that misses a condition) runs the
//   grouped tile GEMMs of grouped_gemm.cuh, scheduled from the device offsets by one tiny
//   kernel, in opmath, deterministic.
// - The library GEMM leaves rows past the last group unspecified and may leave the weight
//   gradient of an expert with no rows unspecified, so a row kernel zeroes the padding rows
//   (reading offsets[E] on the device) and empty experts' gradients are overwritten with
//   zeros, never multiplied, so garbage NaN cannot leak. The own kernels write both directly.
// - Biases: b1 is added by the activation pass on the library path (it already touches every
//   hidden element) and in the GEMM epilogue on the own path; b2 likewise in the padding row
//   kernel or the epilogue. Bias gradients are per-expert column sums reduced in a fixed order.
// - One fused elementwise kernel per direction covers every activation (activation_kernels.cuh);
//   the backward one also recomputes act(hidden), which the weight gradient of w2 needs.
// - Weights are read row-major: a transposed w1 / w2 (Hugging Face's GPT-OSS and Llama-4 layout)
//   is copied by .contiguous() on every call for now, and its gradient copied back into the
//   weight's layout (the strides the fake kernel's empty_like gives), which the CPU kernels
//   avoid. Interleaved gate/up rows need no GEMM change (the GEMMs treat w1's rows opaquely):
//   only the activation kernels map a gate/up column to its hidden column.
// - All index math is int64; offsets are checked on the device (CUDA_KERNEL_ASSERT) and every
//   kernel reads a clamped copy, so bad offsets cannot cause out-of-bounds accesses.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>

#include "activation.h"
#include "checks.h"
#include "ffn_checks.h"
#include "cuda/activation_kernels.cuh"
#include "cuda/grouped_gemm.cuh"

namespace sparsemoe {
namespace {


// --- at::_grouped_mm fast path -----------------------------------------------------------------

// Whether torch runs at::_grouped_mm on this device with its CUTLASS kernel (compute capability
// 9.x or 10.x, the test torch itself makes). The attribute query does not synchronise; the
// answer is cached per device all the same.
bool device_has_grouped_mm_kernel(c10::DeviceIndex device) {
  constexpr int kCachedDevices = 128;
  static std::atomic<int> known[kCachedDevices];  // 0 unknown, 1 yes, 2 no
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable) {
    const int k = known[device].load(std::memory_order_relaxed);
    if (k != 0) return k == 1;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const bool yes = major == 9 || major == 10;
  if (cacheable) known[device].store(yes ? 1 : 2, std::memory_order_relaxed);
  return yes;
}

// Rows the library kernel's TMA loads accept: unit column stride, rows packed exactly (a
// single-row tensor may carry any row stride and still be "contiguous") and a 16-byte aligned
// start.
bool dense_aligned_rows(const at::Tensor& t) {
  return t.stride(-1) == 1 && t.stride(-2) == t.size(-1) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The conditions under which at::_grouped_mm takes its CUTLASS path for every call below: bf16,
// sm90 / sm100, fewer than 1024 groups, int32 row counts, 16-byte row strides for every operand
// and every per-group start (d and f multiples of 8 make all of them multiples of 16 bytes).
bool library_grouped_mm_applies(const FfnDims& s, std::initializer_list<at::Tensor> operands) {
  if (operands.begin()->scalar_type() != at::kBFloat16) return false;
  if (s.E < 1 || s.E >= 1024 || s.N < 1 || s.N > std::numeric_limits<int32_t>::max()) return false;
  if (s.d <= 0 || s.f <= 0 || s.d % 8 != 0 || s.f % 8 != 0) return false;
  for (const at::Tensor& t : operands) {
    if (!dense_aligned_rows(t)) return false;
  }
  return device_has_grouped_mm_kernel(operands.begin()->get_device());
}

// out [N, W] from the library GEMM: rows past offsets[E] are unspecified there and become 0;
// expert rows get bias[e] added when a bias is given. One warp per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    finish_rows_kernel(scalar_t* __restrict__ out, int64_t W, const scalar_t* __restrict__ bias,
                       const int64_t* __restrict__ offsets, int64_t E, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= N) return;
  scalar_t* o = out + row * W;
  if (row >= offsets[E]) {
    for (int64_t j = lane; j < W; j += kWarp) o[j] = scalar_t(0);
    return;
  }
  if (bias == nullptr) return;
  const scalar_t* b = bias + last_at_or_below(offsets, E, row) * W;
  for (int64_t j = lane; j < W; j += kWarp) o[j] = static_cast<scalar_t>(static_cast<acc_t>(o[j]) + static_cast<acc_t>(b[j]));
}

constexpr int kZeroThreads = 256;
constexpr int64_t kZeroChunk = 4 * kZeroThreads;  // elements per block

// out [E, per_expert]: experts that own no rows get exact zeros (a store, not a product, so
// whatever the library kernel left there cannot survive); other experts are left alone.
template <typename scalar_t>
__global__ void __launch_bounds__(kZeroThreads)
    zero_empty_experts_kernel(scalar_t* __restrict__ out, int64_t per_expert, const int64_t* __restrict__ offsets,
                              int64_t chunks) {
  const int64_t e = blockIdx.x / chunks;
  if (offsets[e + 1] > offsets[e]) return;
  const int64_t begin = (blockIdx.x % chunks) * kZeroChunk;
  const int64_t end = min_i64(per_expert, begin + kZeroChunk);
  scalar_t* out_e = out + e * per_expert;
  for (int64_t i = begin + threadIdx.x; i < end; i += kZeroThreads) out_e[i] = scalar_t(0);
}

template <typename scalar_t>
void finish_rows(at::Tensor& out, const at::Tensor& bias, const ExpertSchedule& s) {
  const int64_t N = out.size(0);
  finish_rows_kernel<scalar_t>
      <<<grid_blocks(row_blocks(N), "x_sorted rows"), kWarp * kRowsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          out.data_ptr<scalar_t>(), out.size(1), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, s.offsets(),
          s.E, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void zero_empty_experts(at::Tensor& grad_w, const ExpertSchedule& s, const char* what) {
  const int64_t per_expert = grad_w.numel() / s.E;
  const int64_t chunks = ceil_div(per_expert, kZeroChunk);
  zero_empty_experts_kernel<scalar_t>
      <<<grid_blocks(s.E * chunks, what), kZeroThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_w.data_ptr<scalar_t>(), per_expert, s.offsets(), chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-group GEMM through the CUTLASS kernel; only called when library_grouped_mm_applies.
// Its outputs are allocated with rows padded to 16 bytes, which the dims make exact, so
// contiguous() is a no-op kept as a guard for the raw-pointer kernels that follow.
at::Tensor library_grouped_mm(const at::Tensor& a, const at::Tensor& b, const ExpertSchedule& s) {
  return at::_grouped_mm(a, b, s.ends).contiguous();
}

// A weight gradient in the layout at::empty_like gives the weight (as the fake kernel says); the
// kernels above write row-major ones, so a transposed weight's gradient is copied.
at::Tensor in_layout_of(const at::Tensor& grad, const at::Tensor& weight) {
  if (weight.is_contiguous() && weight.strides() == grad.strides()) return grad;
  at::Tensor out = at::empty_like(weight, at::MemoryFormat::Preserve);
  if (out.strides() == grad.strides()) return grad;
  out.copy_(grad);
  return out;
}

// --- ops -------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> expert_ffn_cuda(const at::Tensor& x_in, const at::Tensor& offsets_in,
                                                   const at::Tensor& w1_in, const at::Tensor& w2_in,
                                                   c10::string_view activation,
                                                   const c10::optional<at::Tensor>& b1_in,
                                                   const c10::optional<at::Tensor>& b2_in, double swiglu_alpha,
                                                   double swiglu_limit, bool gate_up_interleaved,
                                                   const c10::optional<at::Tensor>& packed) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const FfnDims s = check_ffn_shapes(x_in, offsets_in, w1_in, w2_in, act, b1_in, b2_in, gate_up_interleaved);
  // The packed panels are the CPU micro-kernel's layout; the CUDA kernels read w1 and w2.
  TORCH_CHECK(!packed.has_value(), "packed: expected None on CUDA (pack_expert_weights is for the CPU "
              "kernels), got a tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor b1 = contiguous_or_undefined(b1_in), b2 = contiguous_or_undefined(b2_in);
  const bool library = library_grouped_mm_applies(s, {x, w1, w2});
  const ExpertSchedule sched = schedule_experts(offsets, s.N, library);

  at::Tensor hidden, y;
  at::Tensor a = at::empty({s.N, s.f}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_ffn_cuda", [&] {
    if (library) {
      hidden = library_grouped_mm(x, w1.transpose(1, 2), sched);
      activation_forward_rows<scalar_t>(hidden, b1, sched, act, gate_up_interleaved, /*zero_padding_hidden=*/true, a);
      y = library_grouped_mm(a, w2.transpose(1, 2), sched);
      finish_rows<scalar_t>(y, b2, sched);
    } else {
      hidden = at::empty({s.N, s.F1}, x.options());
      grouped_rows_gemm<scalar_t>(x, w1, /*w_is_out_by_k=*/true, b1, sched, hidden, "w1");
      activation_forward_rows<scalar_t>(hidden, at::Tensor(), sched, act, gate_up_interleaved,
                                          /*zero_padding_hidden=*/false, a);
      y = at::empty({s.N, s.d}, x.options());
      grouped_rows_gemm<scalar_t>(a, w2, /*w_is_out_by_k=*/true, b2, sched, y, "w2");
    }
  });
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& offsets_in, const at::Tensor& w1_in,
    const at::Tensor& w2_in, const at::Tensor& hidden_in, c10::string_view activation, double swiglu_alpha,
    double swiglu_limit, bool bias_grads, bool gate_up_interleaved) {
  const ActivationSpec act = parse_activation(std::string(activation), swiglu_alpha, swiglu_limit);
  const FfnDims s = check_ffn_shapes(x_in, offsets_in, w1_in, w2_in, act, c10::nullopt, c10::nullopt,
                                     gate_up_interleaved);
  check_ffn_backward_inputs(grad_y_in, x_in, hidden_in, s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor gy = grad_y_in.contiguous(), hidden = hidden_in.contiguous();
  const bool library = library_grouped_mm_applies(s, {x, w1, w2, gy});
  const ExpertSchedule sched = schedule_experts(offsets, s.N, library);

  at::Tensor grad_h = at::empty({s.N, s.F1}, x.options());
  at::Tensor a = at::empty({s.N, s.f}, x.options());
  at::Tensor grad_x, grad_w1, grad_w2;
  at::Tensor grad_b1 = at::empty({bias_grads ? s.E : 0, s.F1}, x.options());
  at::Tensor grad_b2 = at::empty({bias_grads ? s.E : 0, s.d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_ffn_backward_cuda", [&] {
    if (library) {
      // Rows of grad_a past offsets[E] are unspecified; the activation pass reads expert rows only.
      const at::Tensor grad_a = library_grouped_mm(gy, w2, sched);
      activation_backward_rows<scalar_t>(grad_a, hidden, sched, act, gate_up_interleaved, grad_h, a);
      grad_x = library_grouped_mm(grad_h, w1, sched);
      finish_rows<scalar_t>(grad_x, at::Tensor(), sched);
      grad_w2 = library_grouped_mm(gy.t(), a, sched);
      zero_empty_experts<scalar_t>(grad_w2, sched, "w2");
      grad_w1 = library_grouped_mm(grad_h.t(), x, sched);
      zero_empty_experts<scalar_t>(grad_w1, sched, "w1");
    } else {
      at::Tensor grad_a = at::empty({s.N, s.f}, x.options());
      grouped_rows_gemm<scalar_t>(gy, w2, /*w_is_out_by_k=*/false, at::Tensor(), sched, grad_a, "w2");
      activation_backward_rows<scalar_t>(grad_a, hidden, sched, act, gate_up_interleaved, grad_h, a);
      grad_x = at::empty({s.N, s.d}, x.options());
      grouped_rows_gemm<scalar_t>(grad_h, w1, /*w_is_out_by_k=*/false, at::Tensor(), sched, grad_x, "w1");
      grad_w2 = at::empty({s.E, s.d, s.f}, x.options());
      grouped_weight_grad<scalar_t>(gy, a, sched, grad_w2, "w2");
      grad_w1 = at::empty({s.E, s.F1, s.d}, x.options());
      grouped_weight_grad<scalar_t>(grad_h, x, sched, grad_w1, "w1");
    }
    if (bias_grads) {
      expert_column_sums<scalar_t>(gy, sched, grad_b2, "b2");
      expert_column_sums<scalar_t>(grad_h, sched, grad_b1, "b1");
    }
  });
  return {grad_x, in_layout_of(grad_w1, w1_in), in_layout_of(grad_w2, w2_in), grad_b1, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CUDA, m) {
  m.impl("expert_ffn", &expert_ffn_cuda);
  m.impl("expert_ffn_backward", &expert_ffn_backward_cuda);
}

}  // namespace sparsemoe
