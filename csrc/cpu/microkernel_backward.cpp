// The expert FFN's backward blocks on the GEMM micro-kernel (cpu/microkernel_backward.h).
#include "cpu/microkernel_backward.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/activation_kernels.h"
#include "cpu/float_tiles.h"
#include "cpu/packed_weights.h"

namespace sparsemoe {
namespace {

// float32 buffers write the micro-kernel's output in place; other dtypes round a float32 tile.
template <typename T>
constexpr bool kFloat = std::is_same_v<T, float>;

// C [M, N] = A @ B into `out` (row stride ldo) of type T: in place for float32, else through
// `tile` and one rounding.
template <typename T>
void gemm_into(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, T* out,
               int64_t ldo, std::vector<float>& tile) {
  if constexpr (kFloat<T>) {
    panel_gemm(M, N, K, A, lda, B, ldb, out, ldo, false);
  } else {
    tile.resize(static_cast<size_t>(M * N));
    panel_gemm(M, N, K, A, lda, B, ldb, tile.data(), N, false);
    store_tile<T>(tile.data(), M, N, nullptr, out, ldo, 1);
  }
}

// The weight gradients reduce over the expert's rows, which can be thousands: one micro-kernel
// call would sum them in one sequential chain per element, with a rounding error growing with
// the row count. Chunks of rows are summed separately and their tiles added, so the error grows
// with K / kRowChunk + kRowChunk instead, near the BLAS's own.
constexpr int64_t kRowChunk = 64;

// (The weight gradients' K is bounded by kRowChunk as kRowsPerCall bounds M.)

// out [M, N] (row stride ldo) = A [M, K] @ B [K, N], rounded once to T, K the rows.
template <typename T>
void gemm_over_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    T* out, int64_t ldo, std::vector<float>& total, std::vector<float>& part) {
  if (K <= kRowChunk) return gemm_into<T>(M, N, K, A, lda, B, ldb, out, ldo, part);
  total.resize(static_cast<size_t>(M * N));
  part.resize(static_cast<size_t>(M * N));
  panel_gemm(M, N, kRowChunk, A, lda, B, ldb, total.data(), N, false);
  for (int64_t k0 = kRowChunk; k0 < K; k0 += kRowChunk) {
    const int64_t kn = std::min(kRowChunk, K - k0);
    panel_gemm(M, N, kn, A + k0, lda, B + k0 * ldb, ldb, part.data(), N, false);
    for (int64_t i = 0; i < M * N; ++i) total[i] += part[i];
  }
  store_tile<T>(total.data(), M, N, nullptr, out, ldo, 1);
}

}  // namespace

template <typename T>
void block_bias_grads(const MicrokernelBackward& p, const Block& b, const T* grad_h, int64_t ld, bool first) {
  if (!p.bias_grads) return;
  const FfnDims& s = p.s;
  const bool il = p.gate_up_interleaved;
  const int64_t H = is_gated(p.act) ? 2 : 1, n = b.n, cn = b.cn;
  for (int64_t half = 0; half < H; ++half) {
    const int64_t row0 = il ? 2 * b.c0 + half : half * s.f + b.c0, step = il ? 2 : 1;
    T* gb = p.grad_b1.data_ptr<T>() + b.e * s.F1 + row0;
    for (int64_t c = 0; c < cn; ++c) {
      double sum = 0.0;  // over all the rows: double keeps the error from growing with them
      for (int64_t r = 0; r < n; ++r) sum += static_cast<double>(grad_h[r * ld + half * cn + c]);
      gb[c * step] = static_cast<T>(sum);
    }
  }
  if (!first) return;
  const T* gy = p.gy.data_ptr<T>() + b.r0 * s.d;
  T* gb = p.grad_b2.data_ptr<T>() + b.e * s.d;
  for (int64_t c = 0; c < s.d; ++c) {
    double sum = 0.0;
    for (int64_t r = 0; r < n; ++r) sum += static_cast<double>(gy[r * s.d + c]);
    gb[c] = static_cast<T>(sum);
  }
}

template <typename T>
void microkernel_backward_block(const MicrokernelBackward& p, const Block& b, T* dx, bool first) {
  const FfnDims& s = p.s;
  const bool il = p.gate_up_interleaved;
  const int64_t H = is_gated(p.act) ? 2 : 1, n = b.n, cn = b.cn;
  // Per-block scratch, freed with the block: a bf16 block is a whole expert, and buffers kept per
  // thread would hold the largest expert's for the life of the process.
  std::vector<float> gy_f, x_f, w_f, at_f, tile, acc, total;
  std::vector<T> grad_a, a, grad_h, halves;
  grad_a.resize(static_cast<size_t>(n * cn));
  a.resize(static_cast<size_t>(n * cn));
  grad_h.resize(static_cast<size_t>(n * H * cn));
  const T* gy = p.gy.data_ptr<T>() + b.r0 * s.d;
  const T* x = p.x.data_ptr<T>() + b.r0 * s.d;
  const T* w1 = p.w1.data_ptr<T>() + b.e * p.w1.stride(0);
  const T* w2 = p.w2.data_ptr<T>() + b.e * p.w2.stride(0);
  const int64_t ld1 = p.w1.stride(1), ld2 = p.w2.stride(1);

  // grad_a [n, cn] = grad_y [n, d] @ w2[e][:, c0 : c0 + cn], rounded to T as an eager GEMM would.
  const float* gyf = float_rows<T>(gy, s.d, n, s.d, gy_f);
  const float* w2f = kFloat<T> ? reinterpret_cast<const float*>(w2 + b.c0) : float_rows<T>(w2 + b.c0, ld2, s.d, cn, w_f);
  for (int64_t r = 0; r < n; r += kRowsPerCall) {
    const int64_t m = std::min(kRowsPerCall, n - r);
    gemm_into<T>(m, cn, s.d, gyf + r * s.d, s.d, w2f, kFloat<T> ? ld2 : cn, grad_a.data() + r * cn, cn, tile);
  }

  // The activation's backward on the block's hidden columns: grad_h in [gate | up] halves, and a.
  const T* h = p.hidden.data_ptr<T>() + b.r0 * s.F1;
  ActIn<T> hin{h + b.c0, H == 2 ? h + s.f + b.c0 : nullptr, s.F1};
  if (il) {
    halves.resize(static_cast<size_t>(n * 2 * cn));
    split_gate_up<T>(h + 2 * b.c0, s.F1, halves.data(), 2 * cn, n, cn);
    hin = {halves.data(), halves.data() + cn, 2 * cn};
  }
  T* gh = grad_h.data();
  activation_backward_block<T>(p.act, grad_a.data(), cn, hin, {gh, H == 2 ? gh + cn : nullptr, H * cn},
                               {a.data(), nullptr, cn}, n, cn);

  // grad_w2[e][:, c0 : c0 + cn] [d, cn] = grad_y^T [d, n] @ a [n, cn].
  const float* gyt = float_transposed<T>(gy, s.d, n, s.d, at_f);
  const float* af = float_rows<T>(a.data(), cn, n, cn, x_f);
  gemm_over_rows<T>(s.d, cn, n, gyt, n, af, cn, p.grad_w2.data_ptr<T>() + b.e * p.grad_w2.stride(0) + b.c0,
                    p.grad_w2.stride(1), total, tile);

  // Each half's rows of grad_w1 [cn, d] = grad_h_half^T [cn, n] @ x [n, d]; then the bias gradients.
  const float* xf = float_rows<T>(x, s.d, n, s.d, x_f);
  for (int64_t half = 0; half < H; ++half) {
    // w1 / grad_w1 rows of activation column c: 2c + half (interleaved) or half * f + c.
    const int64_t row0 = il ? 2 * b.c0 + half : half * s.f + b.c0, step = il ? 2 : 1;
    const float* ght = float_transposed<T>(gh + half * cn, H * cn, n, cn, at_f);
    gemm_over_rows<T>(cn, s.d, n, ght, n, xf, s.d,
                      p.grad_w1.data_ptr<T>() + b.e * p.grad_w1.stride(0) + row0 * p.grad_w1.stride(1),
                      step * p.grad_w1.stride(1), total, tile);
  }
  block_bias_grads<T>(p, b, gh, H * cn, first);

  // dx [n, d] = sum over the halves of grad_h_half [n, cn] @ w1[e][half's rows] [cn, d], summed in
  // float32 and rounded once.
  float* sum = kFloat<T> ? reinterpret_cast<float*>(dx) : nullptr;
  if constexpr (!kFloat<T>) {
    acc.resize(static_cast<size_t>(n * s.d));
    sum = acc.data();
  }
  for (int64_t half = 0; half < H; ++half) {
    const int64_t row0 = il ? 2 * b.c0 + half : half * s.f + b.c0, step = il ? 2 : 1;
    const float* ghf = kFloat<T> ? reinterpret_cast<const float*>(gh + half * cn) : float_rows<T>(gh + half * cn, H * cn, n, cn, x_f);
    const float* w1f = kFloat<T> ? reinterpret_cast<const float*>(w1 + row0 * ld1)
                                 : float_rows<T>(w1 + row0 * ld1, step * ld1, cn, s.d, w_f);
    const int64_t ldg = kFloat<T> ? H * cn : cn;
    for (int64_t r = 0; r < n; r += kRowsPerCall) {
      const int64_t m = std::min(kRowsPerCall, n - r);
      panel_gemm(m, s.d, cn, ghf + r * ldg, ldg, w1f, kFloat<T> ? step * ld1 : s.d, sum + r * s.d, s.d,
                 /*accumulate=*/half > 0);
    }
  }
  if constexpr (!kFloat<T>) store_tile<T>(acc.data(), n, s.d, nullptr, dx, s.d, 1);
}

#define SPARSEMOE_MICROKERNEL_BACKWARD(T) \
  template void microkernel_backward_block<T>(const MicrokernelBackward&, const Block&, T*, bool); \
  template void block_bias_grads<T>(const MicrokernelBackward&, const Block&, const T*, int64_t, bool);
SPARSEMOE_MICROKERNEL_BACKWARD(float)
SPARSEMOE_MICROKERNEL_BACKWARD(c10::BFloat16)
SPARSEMOE_MICROKERNEL_BACKWARD(c10::Half)

}  // namespace sparsemoe
