// Expert weights packed once for the CPU micro-kernel, and the GEMM that reads them.
//
// oneDNN's small-GEMM kernel, exported by torch as at::native::cpublas::brgemm, multiplies a
// row-major A [M, K] by a row-major B [K, N] into a float32 C, with no per-call packing and no
// per-call thread fork: the BLAS (at::mm) instead re-packs its weight operand on every call,
// which for an expert's few tens of rows costs as much memory traffic as the product. The expert
// weights are stored the other way round (w1 [F1, d], w2 [d, f] per expert, out-features first),
// so they are transposed once into column panels: each panel is the [K, width] row-major slab of
// `width` output columns, small enough to stay in L2 while every row of the expert streams past
// it. A block of output columns is then a few micro-kernel calls on panels that sit contiguously
// in memory, whatever layout (row-major, column-major, interleaved gate/up) the weights had.
//
// Packed layout, in the weights' dtype, one row of `per_expert()` elements per expert:
//   w1 part: for each half h (gate, then up; one half for ungated activations) the activation
//            columns [0, f) in panels of pw1 columns; the panel of columns [c0, c0 + w) holds
//            the [d, w] slab of w1[row(h, c0 + c), k], and starts at (h * f + c0) * kd.
//   w2 part: the output columns [0, d) in panels of pw2 columns; the panel of columns [c0, c0 + w)
//            holds the [f, w] slab of w2[c0 + c, k], and starts at halves * f * kd + c0 * kf.
// A slab [K, w] of S[c, k] is stored one of two ways:
//   plain  (float32; bfloat16 / float16 where no native bf16 micro-kernel runs, widened exactly
//           to float32 slice by slice where a block multiplies them): P[k * w + c] = S[c, k],
//           kd = d, kf = f;
//   pairs  (bfloat16 where the CPU has AVX512-BF16 or AMX, whose micro-kernel multiplies bf16
//           pairs, VNNI): P[(k / 2) * 2w + 2c + k % 2] = S[c, k], the reduction padded with one
//           zero to an even length: kd = d rounded up to even, kf likewise.
// The panel widths depend only on the reduction length, never on the batch or the thread count,
// so every output element is always one micro-kernel reduction over the same K in the same order.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

namespace sparsemoe {

// A panel of about this many bytes stays in L2 beside the rows that stream past it.
constexpr int64_t kPanelBytes = int64_t(128) << 10;

inline int64_t panel_width(int64_t K) {
  const int64_t w = kPanelBytes / (int64_t(sizeof(float)) * std::max<int64_t>(K, 1)) / 16 * 16;
  return std::clamp<int64_t>(w, 16, 64);
}

// Panels in pairs are as wide as the bf16 kernel wants them: it computes 16-column tiles (AMX)
// and reuses each row's tile of A across the panel's columns, so a 16-column panel (float32's
// width for K >= 2048) ran it at half speed (mixtral-like f = 1792). 32-64 columns of bf16 pairs
// stay within the 2 MiB L2 of the CPUs that have them for K up to 16384.
inline int64_t pairs_panel_width(int64_t K) {
  const int64_t w = 4 * kPanelBytes / (int64_t(sizeof(c10::BFloat16)) * std::max<int64_t>(K, 1)) / 32 * 32;
  return std::clamp<int64_t>(w, 32, 64);
}

struct PackedLayout {
  int64_t d, f, halves, pw1, pw2;
  bool pairs;   // VNNI pairs along the reduction (see above)
  int64_t kd, kf;  // the reduction lengths as stored: d and f, rounded up to even for pairs

  PackedLayout(int64_t d_, int64_t f_, int64_t halves_, bool pairs_)
      : d(d_), f(f_), halves(halves_), pw1(pairs_ ? pairs_panel_width(d_) : panel_width(d_)),
        pw2(pairs_ ? pairs_panel_width(f_) : panel_width(f_)), pairs(pairs_),
        kd(pairs_ ? (d_ + 1) / 2 * 2 : d_), kf(pairs_ ? (f_ + 1) / 2 * 2 : f_) {}

  int64_t w1_elems() const { return halves * f * kd; }
  int64_t per_expert() const { return w1_elems() + d * kf; }
  int64_t w1_panel(int64_t h, int64_t c0) const { return (h * f + c0) * kd; }
  int64_t w2_panel(int64_t c0) const { return w1_elems() + c0 * kf; }
};

// Whether ATen reports the CPU feature `feature` here (at::cpu::get_cpu_capabilities' names:
// "avx512_bf16", "amx_bf16", ...).
bool cpu_has(const char* feature);

// Whether bfloat16 panels are stored in pairs and multiplied by oneDNN's native bf16
// micro-kernel here (torch exports it, the CPU has AVX512-BF16 or AMX, and a probe product
// checked out): only then are `dtype` panels in pairs.
bool panels_in_pairs(at::ScalarType dtype);

// The layout pack_expert_weights gives to experts of these sizes in `dtype`.
inline PackedLayout packed_layout(int64_t d, int64_t f, int64_t halves, at::ScalarType dtype) {
  return PackedLayout(d, f, halves, panels_in_pairs(dtype));
}

// C [M, N] (row stride ldc, float32) = A [M, K] @ B (+ C when accumulate) for bfloat16 A (row
// stride lda) and B a [K, N] slab in pairs (K even, ldb = N's stride in pairs: the pair row k / 2
// starts at B + k * ldb), on the native bf16 micro-kernel. The hardware context it leaves set
// (AMX tiles) must be released with release_pairs_gemm before the thread runs other GEMMs.
void pairs_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                int64_t ldb, float* C, int64_t ldc, bool accumulate);
void release_pairs_gemm();

// panel_gemm and pairs_gemm stream products of at most kStreamMaxRows rows (cpu/stream_gemm.h)
// where the CPU runs those kernels and a probe checked them: bitwise against the micro-kernel for
// float32 (so that no row's bits depend on how many rows share its product), exact sums for pairs.
bool stream_f32_matches_microkernel();
bool stream_pairs_exact();
// Whether few-row products of `dtype` panels stream here (float32; bfloat16 panels in pairs).
bool panels_stream(at::ScalarType dtype);

// The micro-kernel's calls cover tiles of at most this many columns of C and this much of the
// reduction (panel_gemm).
constexpr int64_t kTileCols = 64, kTileDepth = 256;

// C [M, N] (row stride ldc) = A [M, K] @ B [K, N] (+ C when accumulate), all float32 and
// row-major: the micro-kernel where torch has it (tile by tile, the reduction always split at the
// same depths, so an element's sum never depends on M), else the BLAS on the same operands.
void panel_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool accumulate);

// Whether panel_gemm runs oneDNN's micro-kernel here: built against a torch that exports it, and
// a small product checked once against a plain loop. Without it the packed path gains nothing,
// so callers keep the unpacked one.
bool panel_gemm_is_microkernel();

// Whether expert GEMMs in `dtype` gain from running on the float32 micro-kernel (bfloat16 and
// float16 operands widened exactly): float32 wherever the micro-kernel runs; bfloat16 only on
// CPUs without AVX-512 (float16: without AVX512-FP16 / AMX-FP16), where ATen's GEMMs for them
// are emulated and several times slower, while on the others oneDNN's own are faster.
bool microkernel_pays(at::ScalarType dtype);

// Whether the forward gains from packed panels in `dtype`: on the float32 micro-kernel as above,
// or bfloat16 in pairs on the native bf16 one (which beats oneDNN's bf16 GEMMs there, since those
// re-pack the weight operand on every call).
bool packed_weights_pay(at::ScalarType dtype);

// Checks `packed` against the shapes of the FFN it was packed for (x's dtype, CPU, [E, per_expert]).
void check_packed(const at::Tensor& packed, const at::Tensor& x, int64_t E, const PackedLayout& layout);

}  // namespace sparsemoe
