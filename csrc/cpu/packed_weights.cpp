// Packing of the expert weights into the micro-kernel's panels (cpu/packed_weights.h), the
// GEMM on them, and its one-time probe.
#include "cpu/packed_weights.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "checks.h"
#include "cpu/large_buffers.h"
#include "cpu/stream_gemm.h"
#include "cpu/to_float.h"
#include "ffn_checks.h"

namespace sparsemoe {

namespace {

// panel_gemm on oneDNN's micro-kernel alone (or the BLAS without it).
void microkernel_panel_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                            int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  // One call per tile of at most kTileCols columns and kTileDepth reductions, the later depths
  // accumulating into the tile: the micro-kernel does not block B for the cache itself, and a B
  // slab wider or deeper than that falls out of L1 / L2 between its rows (measured on the
  // backward's grad_a and grad_x products, N = 256-512: 50 GFLOP/s per core untiled, 70-80 tiled).
  for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
    const int64_t nn = std::min(kTileCols, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += kTileDepth) {
      at::native::cpublas::brgemm(M, nn, std::min(kTileDepth, K - k0), lda, ldb, ldc, accumulate || k0 > 0, A + k0,
                                  B + k0 * ldb + n0, C + n0, /*is_vnni=*/false);
    }
  }
#else
  // Column-major BLAS view of the same row-major product: C^T = B^T A^T.
  at::native::cpublas::gemm(at::native::TransposeType::NoTranspose, at::native::TransposeType::NoTranspose, N, M,
                            K, 1.0f, B, ldb, A, lda, accumulate ? 1.0f : 0.0f, C, ldc);
#endif
}

void microkernel_pairs_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                            const c10::BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  // Whole reductions per call: the bf16 kernel blocks K itself, and a 64-column slab of pairs is
  // half a float32 panel's bytes.
  for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
    at::native::cpublas::brgemm(M, std::min(kTileCols, N - n0), K, lda, ldb, ldc, accumulate, A, B + 2 * n0,
                                C + n0, /*is_vnni=*/true);
  }
#else
  TORCH_CHECK(false, "pairs_gemm: this torch does not export the bf16 micro-kernel");
#endif
}

}  // namespace

void panel_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    // No reduction: the product is zero (the micro-kernel is not asked for K = 0).
    for (int64_t r = 0; r < M && !accumulate; ++r) std::fill(C + r * ldc, C + r * ldc + N, 0.0f);
    return;
  }
  // A few rows stream the panel, where that gives the micro-kernel's own bits (checked once), so
  // that a row's result never depends on how many rows share its product.
  if (M <= kStreamMaxRows && stream_f32_matches_microkernel()) {
    return stream_gemm_f32(M, N, K, kTileDepth, A, lda, B, ldb, C, ldc, accumulate);
  }
  microkernel_panel_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void pairs_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  TORCH_CHECK(K % 2 == 0, "pairs_gemm: expected an even reduction length (panels in pairs are padded), got ", K);
  if (K == 0) {
    for (int64_t r = 0; r < M && !accumulate; ++r) std::fill(C + r * ldc, C + r * ldc + N, 0.0f);
    return;
  }
  // bf16 has no batch invariance to keep (its kernels change with the rows per expert anyway);
  // the pairs kernel is checked against exact sums.
  if (M <= kStreamMaxRows && stream_pairs_exact()) {
    return stream_gemm_pairs(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
  microkernel_pairs_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void release_pairs_gemm() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
}

bool cpu_has(const char* feature) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(feature);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

namespace {

// The bf16 kernel on pairs, checked like the float32 one (odd M and N, wide leading dimensions,
// an accumulating call). Only asked where the CPU has the instructions: elsewhere oneDNN's
// kernel would not be there to ask, and an odd K is never passed (it faults).
bool probe_pairs() {
#if !defined(CPUBLAS_BRGEMM_BF16BF16F32)
  return false;
#else
  if (!at::globalContext().userEnabledMkldnn() || !panel_gemm_is_microkernel()) return false;
  if (!cpu_has("avx512_bf16") && !cpu_has("amx_bf16")) return false;
  constexpr int64_t M = 5, N = 23, K = 38, lda = 40, ldb = 29, ldc = 31;
  std::vector<c10::BFloat16> A(M * lda), B(K * ldb);
  std::vector<float> C(M * ldc, 0.0f);
  const auto a_of = [](int64_t r, int64_t k) { return static_cast<float>(((r * 7 + k * 3) % 13) - 6) / 8.0f; };
  const auto b_of = [](int64_t k, int64_t c) { return static_cast<float>(((k * 5 + c * 11) % 11) - 5) / 4.0f; };
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t k = 0; k < K; ++k) A[r * lda + k] = a_of(r, k);
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < N; ++c) B[(k / 2) * 2 * ldb + 2 * c + k % 2] = b_of(k, c);
  }
  try {
    microkernel_pairs_gemm(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, false);
    microkernel_pairs_gemm(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, true);  // C = 2 A B
    release_pairs_gemm();
  } catch (const c10::Error&) {
    release_pairs_gemm();
    return false;
  }
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t c = 0; c < N; ++c) {
      double want = 0.0;
      for (int64_t k = 0; k < K; ++k) want += 2.0 * a_of(r, k) * b_of(k, c);  // exact in bf16
      if (std::abs(C[r * ldc + c] - want) > 1e-4 * (1.0 + std::abs(want))) return false;
    }
  }
  return true;
#endif
}

// A product with odd sizes and strides (panel tails, a leading dimension wider than the
// operand), against a plain double loop.
bool probe_microkernel() {
#if !defined(CPUBLAS_BRGEMM_F32F32F32)
  return false;
#else
  if (!at::globalContext().userEnabledMkldnn()) return false;
  constexpr int64_t M = 5, N = 23, K = 37, lda = 40, ldb = 29, ldc = 31;
  std::vector<float> A(M * lda), B(K * ldb), C(M * ldc, 0.0f);
  for (size_t i = 0; i < A.size(); ++i) A[i] = static_cast<float>((i * 7 % 13) - 6) / 8.0f;
  for (size_t i = 0; i < B.size(); ++i) B[i] = static_cast<float>((i * 5 % 11) - 5) / 4.0f;
  try {
    microkernel_panel_gemm(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, false);
    microkernel_panel_gemm(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, true);  // C = 2 A B
  } catch (const c10::Error&) {
    return false;
  }
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t c = 0; c < N; ++c) {
      double want = 0.0;
      for (int64_t k = 0; k < K; ++k) want += 2.0 * A[r * lda + k] * B[k * ldb + c];
      if (std::abs(C[r * ldc + c] - want) > 1e-4 * (1.0 + std::abs(want))) return false;
    }
  }
  return true;
#endif
}

// Values whose sums depend on their order (unlike the probes' small multiples of 1/8 above).
std::vector<float> scrambled(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  for (auto& x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = static_cast<float>(static_cast<int32_t>(seed >> 8) - (1 << 23)) / static_cast<float>(1 << 20);
  }
  return v;
}

}  // namespace

// The streaming float32 kernel against the micro-kernel, bitwise, for every row count it takes,
// column tails, several reduction tiles, and an accumulating call: only then may panel_gemm
// stream, since a row's bits must not depend on how many rows share its product.
bool stream_f32_matches_microkernel() {
  static const bool ok = [] {
    if (!stream_f32_runs() || !panel_gemm_is_microkernel()) return false;
    constexpr int64_t lda = 611, ldb = 83, ldc = 85;
    for (const int64_t K : {1, 37, 256, 601}) {
      const std::vector<float> A = scrambled(kStreamMaxRows * lda, 1), B = scrambled(K * ldb, 2);
      for (const int64_t N : {5, 16, 23, 64, 80}) {
        for (int64_t M = 1; M <= kStreamMaxRows; ++M) {
          for (const bool accumulate : {false, true}) {
            std::vector<float> want = scrambled(M * ldc, 3), got = want;
            microkernel_panel_gemm(M, N, K, A.data(), lda, B.data(), ldb, want.data(), ldc, accumulate);
            stream_gemm_f32(M, N, K, kTileDepth, A.data(), lda, B.data(), ldb, got.data(), ldc, accumulate);
            if (std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) != 0) return false;
          }
        }
      }
    }
    return true;
  }();
  return ok;
}

// The streaming pairs kernel against exact sums (small multiples of 1/8: every product and sum
// is exact in float32), with tails and an accumulating call.
bool stream_pairs_exact() {
  static const bool ok = [] {
    if (!stream_pairs_runs()) return false;
    constexpr int64_t lda = 90, ldb = 83, ldc = 85, K = 76;
    const auto a_of = [](int64_t r, int64_t k) { return static_cast<float>(((r * 7 + k * 3) % 13) - 6) / 8.0f; };
    const auto b_of = [](int64_t k, int64_t c) { return static_cast<float>(((k * 5 + c * 11) % 11) - 5) / 4.0f; };
    std::vector<c10::BFloat16> A(kStreamMaxRows * lda), B(K * ldb);
    for (int64_t r = 0; r < kStreamMaxRows; ++r) {
      for (int64_t k = 0; k < K; ++k) A[r * lda + k] = a_of(r, k);
    }
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < ldb / 2; ++c) B[(k / 2) * 2 * ldb + 2 * c + k % 2] = b_of(k, c);
    }
    for (const int64_t N : {5, 16, 23, 41}) {
      for (int64_t M = 1; M <= kStreamMaxRows; ++M) {
        std::vector<float> C(M * ldc, -1.0f);
        stream_gemm_pairs(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, false);
        stream_gemm_pairs(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc, true);  // C = 2 A B
        for (int64_t r = 0; r < M; ++r) {
          for (int64_t c = 0; c < ldc; ++c) {
            double want = -1.0;  // columns from N on are left as they were
            if (c < N) {
              want = 0.0;
              for (int64_t k = 0; k < K; ++k) want += 2.0 * a_of(r, k) * b_of(k, c);
            }
            if (C[r * ldc + c] != want) return false;
          }
        }
      }
    }
    return true;
  }();
  return ok;
}

bool panels_stream(at::ScalarType dtype) {
  if (dtype == at::kFloat) return stream_f32_matches_microkernel();
  return dtype == at::kBFloat16 && panels_in_pairs(dtype) && stream_pairs_exact();
}

namespace {

// One panel: P[k * width + c] = src[c * s_col + k * s_k], for c < width, k < K. Row-major
// weights (s_k = 1) are transposed (bfloat16 / float16 through a float32 tile, exact both ways);
// column-major ones (s_col = 1) are already in the panel's order, row by row.
template <typename T>
void pack_panel(const T* src, int64_t s_col, int64_t s_k, int64_t width, int64_t K, T* P) {
  if (s_k == 1) {
    if constexpr (std::is_same_v<T, float>) {
      return transpose_to_float<T>(src, s_col, width, K, P, width);
    } else {
      thread_local std::vector<float> tile;
      tile.resize(static_cast<size_t>(K * width));
      transpose_to_float<T>(src, s_col, width, K, tile.data(), width);
      for (int64_t i = 0; i < K * width; ++i) P[i] = static_cast<T>(tile[i]);
      return;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* s = src + k * s_k;
    T* p = P + k * width;
    if (s_col == 1) {
      std::copy(s, s + width, p);
    } else {
      for (int64_t c = 0; c < width; ++c) p[c] = s[c * s_col];
    }
  }
}

// One panel in pairs: P[(k / 2) * 2 * width + 2c + k % 2] = src[c * s_col + k * s_k], zero for
// k = K when K is odd (the padding). Row-major bf16 weights whose rows start on 4-byte
// boundaries hold each pair as one 32-bit word: the panel is then the 32-bit transpose of the
// [width, K / 2] words, through the same 8 x 8 register tiles as float32.
void pack_panel_pairs(const c10::BFloat16* src, int64_t s_col, int64_t s_k, int64_t width, int64_t K,
                      c10::BFloat16* P) {
  const int64_t pairs = K / 2;
  if (s_k == 1 && s_col % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0 && pairs > 0) {
    transpose_to_float<float>(reinterpret_cast<const float*>(src), s_col / 2, width, pairs,
                              reinterpret_cast<float*>(P), width);
  } else {
    for (int64_t k = 0; k < 2 * pairs; ++k) {
      c10::BFloat16* p = P + (k / 2) * 2 * width + k % 2;
      for (int64_t c = 0; c < width; ++c) p[2 * c] = src[c * s_col + k * s_k];
    }
  }
  if (K % 2 == 1) {
    c10::BFloat16* p = P + pairs * 2 * width;
    for (int64_t c = 0; c < width; ++c) {
      p[2 * c] = src[c * s_col + (K - 1) * s_k];
      p[2 * c + 1] = c10::BFloat16(0.0f);
    }
  }
}

// The packed layout of w1 and w2, after checking them.
PackedLayout packed_layout_of(const at::Tensor& w1, const at::Tensor& w2, c10::string_view activation,
                              bool gate_up_interleaved) {
  const ActivationSpec act = parse_activation(std::string(activation), 1.702, 7.0);
  check_gate_up_layout(act, gate_up_interleaved);
  check_rank(w1, "w1", 3, "[E, F1, d]");
  check_rank(w2, "w2", 3, "[E, d, f]");
  check_floating(w1, "w1");
  check_dtype(w2, "w2", w1.scalar_type());
  check_same_device(w1, "w1", w2, "w2");
  TORCH_CHECK(w1.scalar_type() != at::kDouble, "w1: expected float32, bfloat16 or float16 weights (the "
              "micro-kernel is float32), got float64");
  const bool gated = is_gated(act);
  const int64_t E = w1.size(0), d = w1.size(2), f = w2.size(2);
  check_size(w2, "w2", 0, E, "E, from w1");
  check_size(w2, "w2", 1, d, "d, from w1");
  check_size(w1, "w1", 1, gated ? 2 * f : f, gated ? "2*f: gate and up rows of a gated activation" : "f, from w2");
  return packed_layout(d, f, gated ? 2 : 1, w1.scalar_type());
}

void pack_into(const at::Tensor& packed, const at::Tensor& w1, const at::Tensor& w2, const PackedLayout& L,
               bool gate_up_interleaved) {
  const int64_t E = w1.size(0), d = L.d, f = L.f;
  // One task per (expert, panel): w1's panels of both halves, then w2's.
  const int64_t p1 = f == 0 ? 0 : (f + L.pw1 - 1) / L.pw1, p2 = d == 0 ? 0 : (d + L.pw2 - 1) / L.pw2;
  const int64_t per = L.halves * p1 + p2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w1.scalar_type(), "pack_expert_weights", [&] {
    const scalar_t* a1 = w1.data_ptr<scalar_t>();
    const scalar_t* a2 = w2.data_ptr<scalar_t>();
    scalar_t* out = packed.data_ptr<scalar_t>();
    // Generic, so that the branch for pairs is only instantiated for bfloat16.
    const auto pack_one = [&](const auto* src, int64_t s_col, int64_t s_k, int64_t width, int64_t K, auto* P) {
      if constexpr (std::is_same_v<std::remove_const_t<std::remove_pointer_t<decltype(src)>>, c10::BFloat16>) {
        if (L.pairs) return pack_panel_pairs(src, s_col, s_k, width, K, P);
      }
      pack_panel<scalar_t>(src, s_col, s_k, width, K, P);
    };
    at::parallel_for(0, E * per, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t e = t / per, j = t % per;
        scalar_t* P = out + e * L.per_expert();
        if (j < L.halves * p1) {
          const int64_t h = j / p1, c0 = (j % p1) * L.pw1, width = std::min(L.pw1, f - c0);
          // Activation column c of half h is w1 row 2c + h (interleaved) or h * f + c.
          const int64_t row0 = gate_up_interleaved ? 2 * c0 + h : h * f + c0;
          const int64_t step = gate_up_interleaved ? 2 : 1;
          pack_one(a1 + e * w1.stride(0) + row0 * w1.stride(1), step * w1.stride(1), w1.stride(2), width, d,
                   P + L.w1_panel(h, c0));
        } else {
          const int64_t c0 = (j - L.halves * p1) * L.pw2, width = std::min(L.pw2, d - c0);
          pack_one(a2 + e * w2.stride(0) + c0 * w2.stride(1), w2.stride(1), w2.stride(2), width, f,
                   P + L.w2_panel(c0));
        }
      }
    });
  });
}

at::Tensor pack_expert_weights_cpu(const at::Tensor& w1, const at::Tensor& w2, c10::string_view activation,
                                   bool gate_up_interleaved) {
  const PackedLayout L = packed_layout_of(w1, w2, activation, gate_up_interleaved);
  // As large as the weights: huge pages keep its first-touch page faults from costing more than the copy.
  at::Tensor packed = empty_large({w1.size(0), L.per_expert()}, w1.options());
  pack_into(packed, w1, w2, L, gate_up_interleaved);
  return packed;
}

// Repacking into the buffer of an earlier pack skips the allocation and its page faults, which
// on a fresh buffer as large as the weights cost more than the packing itself.
void pack_expert_weights_into_cpu(const at::Tensor& packed, const at::Tensor& w1, const at::Tensor& w2,
                                  c10::string_view activation, bool gate_up_interleaved) {
  const PackedLayout L = packed_layout_of(w1, w2, activation, gate_up_interleaved);
  check_same_device(w1, "w1", packed, "packed");
  check_dtype(packed, "packed", w1.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == w1.size(0) && packed.size(1) == L.per_expert(),
              "packed: expected shape [", w1.size(0), ", ", L.per_expert(), "] (the packed size of w1 and w2), got ",
              shape_str(packed));
  TORCH_CHECK(packed.is_contiguous(), "packed: expected a contiguous tensor (as pack_expert_weights returns it)");
  pack_into(packed, w1, w2, L, gate_up_interleaved);
}

}  // namespace

bool panel_gemm_is_microkernel() {
  static const bool ok = probe_microkernel();
  return ok;
}

bool microkernel_pays(at::ScalarType dtype) {
  if (!panel_gemm_is_microkernel()) return false;
  // oneDNN runs bf16 GEMMs from AVX-512 up (natively with AVX512-BF16 / AMX): only below it are
  // ATen's emulated.
  static const bool native_bf16 = cpu_has("avx512_f") || cpu_has("avx512_bf16") || cpu_has("amx_bf16");
  static const bool native_f16 = cpu_has("avx512_fp16") || cpu_has("amx_fp16");
  switch (dtype) {
    case at::kFloat: return true;
    case at::kBFloat16: return !native_bf16;
    case at::kHalf: return !native_f16;
    default: return false;
  }
}

bool panels_in_pairs(at::ScalarType dtype) {
  static const bool ok = probe_pairs();
  return dtype == at::kBFloat16 && ok;
}

bool packed_weights_pay(at::ScalarType dtype) { return microkernel_pays(dtype) || panels_in_pairs(dtype); }

void check_packed(const at::Tensor& packed, const at::Tensor& x, int64_t E, const PackedLayout& layout) {
  TORCH_CHECK(packed.device().is_cpu(), "packed: expected a CPU tensor (the packed weights are a CPU kernel's), "
              "got one on ", packed.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble, "packed: expected None for float64 x_sorted (the micro-kernel is "
              "float32), got a packed tensor");
  check_dtype(packed, "packed", x.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == E && packed.size(1) == layout.per_expert(),
              "packed: expected shape [", E, ", ", layout.per_expert(),
              "] (pack_expert_weights of these w1 and w2), got ", shape_str(packed));
  TORCH_CHECK(packed.is_contiguous(), "packed: expected a contiguous tensor (as pack_expert_weights returns it)");
}

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) {
  m.impl("pack_expert_weights", &pack_expert_weights_cpu);
  m.impl("pack_expert_weights_into", &pack_expert_weights_into_cpu);
}

}  // namespace sparsemoe
