#include "cpu/stream_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEMOE_STREAM_X86 1
#endif

#include "cpu/packed_weights.h"

namespace sparsemoe {

#if defined(SPARSEMOE_STREAM_X86)
namespace {

// Lanes of the last 16-column vector of an n-column tile (n in [1, 64]).
inline __mmask16 tail_mask(int64_t n) {
  const int64_t rem = n - (n - 1) / 16 * 16;
  return static_cast<__mmask16>((1u << rem) - 1u);
}

// Lane mask of vector v of V in an n-column tile: whole but for the last.
template <int V>
inline __mmask16 lanes(int v, __mmask16 last) {
  return v == V - 1 ? last : static_cast<__mmask16>(0xffff);
}

// R rows x V vectors of 16 columns (the last masked): C = A @ B over K reductions (+ C when add).
// The accumulators are one flat array in fully unrolled loops: GCC then keeps them in registers
// (with acc[R][V] it also stored all of them on every reduction step, a third of the speed).
template <int R, int V>
__attribute__((target("avx512f"))) void f32_tile(int64_t n, int64_t K, const float* A, int64_t lda, const float* B,
                                                 int64_t ldb, float* C, int64_t ldc, bool add) {
  const __mmask16 last = tail_mask(n);
  __m512 acc[R * V];
#pragma GCC unroll 16
  for (int i = 0; i < R * V; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    __m512 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = _mm512_maskz_loadu_ps(lanes<V>(v, last), b + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r * V + v] = _mm512_fmadd_ps(a, bv[v], acc[r * V + v]);
    }
  }
  // The tile's sum is added into C after its chain, as the micro-kernel does (a masked add keeps
  // a -0 sum as it is when there is nothing to add).
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      float* c = C + r * ldc + 16 * v;
      const __mmask16 m = lanes<V>(v, last);
      const __m512 sum = acc[r * V + v];
      _mm512_mask_storeu_ps(c, m, _mm512_mask_add_ps(sum, add ? m : 0, sum, _mm512_maskz_loadu_ps(m, c)));
    }
  }
}

// The same on pairs: K / 2 pair rows, each a 32-bit broadcast of the row's pair times V vectors
// of 16 column pairs, the chain starting from C when adding.
template <int R, int V>
__attribute__((target("avx512f,avx512bf16"))) void pairs_tile(int64_t n, int64_t K, const c10::BFloat16* A,
                                                              int64_t lda, const c10::BFloat16* B, int64_t ldb,
                                                              float* C, int64_t ldc, bool add) {
  const __mmask16 last = tail_mask(n);
  __m512 acc[R * V];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      acc[r * V + v] = _mm512_maskz_loadu_ps(add ? lanes<V>(v, last) : 0, C + r * ldc + 16 * v);
    }
  }
  for (int64_t k = 0; k < K; k += 2) {
    const c10::BFloat16* b = B + k * ldb;
    __m512bh bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_maskz_loadu_epi32(lanes<V>(v, last), b + 32 * v);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + k, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r * V + v] = _mm512_dpbf16_ps(acc[r * V + v], a, bv[v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, lanes<V>(v, last), acc[r * V + v]);
  }
}

template <typename T>
using TileFn = void (*)(int64_t, int64_t, const T*, int64_t, const T*, int64_t, float*, int64_t, bool);

// The instantiation for M rows and n columns (both in range).
template <typename T, template <int, int> class Kernel>
TileFn<T> tile_for(int64_t M, int64_t n) {
  static constexpr TileFn<T> table[kStreamRows][4] = {
      {Kernel<1, 1>::fn, Kernel<1, 2>::fn, Kernel<1, 3>::fn, Kernel<1, 4>::fn},
      {Kernel<2, 1>::fn, Kernel<2, 2>::fn, Kernel<2, 3>::fn, Kernel<2, 4>::fn},
      {Kernel<3, 1>::fn, Kernel<3, 2>::fn, Kernel<3, 3>::fn, Kernel<3, 4>::fn},
      {Kernel<4, 1>::fn, Kernel<4, 2>::fn, Kernel<4, 3>::fn, Kernel<4, 4>::fn}};
  return table[M - 1][(n - 1) / 16];
}

template <int R, int V>
struct F32Tile {
  static constexpr TileFn<float> fn = f32_tile<R, V>;
};
template <int R, int V>
struct PairsTile {
  static constexpr TileFn<c10::BFloat16> fn = pairs_tile<R, V>;
};

}  // namespace

bool stream_f32_runs() {
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  return ok;
}

bool stream_pairs_runs() {
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16"));
  return ok;
}

void stream_gemm_f32(int64_t M, int64_t N, int64_t K, int64_t depth, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
    const int64_t n = std::min(kTileCols, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += depth) {
      // Row groups one after the other on the same depth tile: the later ones find it in L2.
      for (int64_t r0 = 0; r0 < M; r0 += kStreamRows) {
        const int64_t m = std::min(kStreamRows, M - r0);
        tile_for<float, F32Tile>(m, n)(n, std::min(depth, K - k0), A + r0 * lda + k0, lda, B + k0 * ldb + n0, ldb,
                                       C + r0 * ldc + n0, ldc, accumulate || k0 > 0);
      }
    }
  }
}

void stream_gemm_pairs(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                       const c10::BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
    const int64_t n = std::min(kTileCols, N - n0);
    for (int64_t r0 = 0; r0 < M; r0 += kStreamRows) {
      const int64_t m = std::min(kStreamRows, M - r0);
      tile_for<c10::BFloat16, PairsTile>(m, n)(n, K, A + r0 * lda, lda, B + 2 * n0, ldb, C + r0 * ldc + n0, ldc,
                                                accumulate);
    }
  }
}

#else  // not x86-64 with GCC: the micro-kernel runs every product

bool stream_f32_runs() { return false; }
bool stream_pairs_runs() { return false; }
void stream_gemm_f32(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*,
                     int64_t, bool) {
  TORCH_CHECK(false, "stream_gemm_f32: not built for this CPU (stream_f32_runs() is false)");
}
void stream_gemm_pairs(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t,
                       float*, int64_t, bool) {
  TORCH_CHECK(false, "stream_gemm_pairs: not built for this CPU (stream_pairs_runs() is false)");
}

#endif

}  // namespace sparsemoe
