#include "cpu/few_rows_gemm.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cpu/vectorizable.h"

namespace sparsemoe {
namespace {

template <typename T>
SPARSEMOE_INLINE void few_rows_impl(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out,
                                    int64_t ldo, int64_t rows, int64_t cols, int64_t K) {
  using A = typename Elem<T>::acc;
  for (int64_t j = 0; j < cols; ++j) {
    const T* wj = w + j * ldw;
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = a + r * lda;
      A acc = 0;
      // The reduction order is the simd lanes', fixed for a given build and CPU.
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += Elem<T>::load(ar + k) * Elem<T>::load(wj + k);
      if (bias != nullptr) acc += Elem<T>::load(bias + j);
      out[r * ldo + j] = static_cast<T>(acc);
    }
  }
}

// Accumulators of the column-major kernel, 16 KiB: with the weight rows streaming through they
// stay in L1. A pass covers as many output columns as fit for the rows at hand, whole weight rows
// where possible, so that the weight is read in long contiguous runs.
constexpr int64_t kAccBytes = 16 << 10;

// Adds weight rows k.. of w, KT at a time while KT of them are left, into the accumulators;
// returns the first row not added. Eight rows at a time load and store the accumulators once per
// eight products: on wide rows (GPT-OSS's 2880 x 5760 experts) that is about twice as fast as
// one row at a time, and as fast as the row-major kernel on the same weights.
template <int KT, typename T, typename A>
SPARSEMOE_INLINE int64_t col_major_rows(const T* a0, int64_t lda, const T* w, int64_t ldw, A* acc, int64_t rn,
                                        int64_t jn, int64_t j0, int64_t K, int64_t k, int64_t segments,
                                        int64_t segment_stride) {
  for (; k + KT <= K; k += KT) {
    for (int64_t sg = 0; sg < segments; ++sg) {
      const T* wt[KT];
      for (int t = 0; t < KT; ++t) wt[t] = w + (k + t) * ldw + sg * segment_stride + j0;
      for (int64_t r = 0; r < rn; ++r) {
        A x[KT];
        for (int t = 0; t < KT; ++t) x[t] = Elem<T>::load(a0 + r * lda + k + t);
        A* __restrict__ acc_r = acc + (sg * rn + r) * jn;
#pragma omp simd
        for (int64_t j = 0; j < jn; ++j) {
          A sum = x[0] * Elem<T>::load(wt[0] + j);
          for (int t = 1; t < KT; ++t) sum += x[t] * Elem<T>::load(wt[t] + j);
          acc_r[j] += sum;
        }
      }
    }
  }
  return k;
}

template <typename T>
SPARSEMOE_INLINE void few_rows_col_major_impl(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias,
                                              T* out, int64_t ldo, int64_t rows, int64_t cols, int64_t K,
                                              int64_t segments, int64_t segment_stride) {
  using A = typename Elem<T>::acc;
  constexpr int64_t kAcc = kAccBytes / sizeof(A);
  alignas(64) A acc[kAcc];
  segments = std::max<int64_t>(1, std::min(segments, kMaxSegments));
  // The accumulators hold kFewRows rows; more rows (never asked for) go in groups.
  for (int64_t r0 = 0; r0 < rows; r0 += kFewRows) {
    const int64_t rn = std::min(kFewRows, rows - r0);
    const T* a0 = a + r0 * lda;
    // Columns per pass: a multiple of 16 (whole cache lines) unless the run is shorter.
    const int64_t fit = std::max<int64_t>(16, kAcc / (rn * segments) / 16 * 16);
    const int64_t step = std::min(cols, fit);
    for (int64_t j0 = 0; j0 < cols; j0 += step) {
      const int64_t jn = std::min(step, cols - j0);
      // The accumulators of (segment sg, row r) are acc[(sg * rn + r) * jn + j].
      std::fill_n(acc, segments * rn * jn, A(0));
      const int64_t k = col_major_rows<8>(a0, lda, w, ldw, acc, rn, jn, j0, K, 0, segments, segment_stride);
      col_major_rows<1>(a0, lda, w, ldw, acc, rn, jn, j0, K, k, segments, segment_stride);
      for (int64_t sg = 0; sg < segments; ++sg) {
        const T* b = bias != nullptr ? bias + sg * segment_stride + j0 : nullptr;
        for (int64_t r = 0; r < rn; ++r) {
          T* o = out + (r0 + r) * ldo + sg * segment_stride + j0;
          const A* acc_r = acc + (sg * rn + r) * jn;
          for (int64_t j = 0; j < jn; ++j) {
            o[j] = static_cast<T>(b != nullptr ? acc_r[j] + Elem<T>::load(b + j) : acc_r[j]);
          }
        }
      }
    }
  }
}

}  // namespace

#define SPARSEMOE_FEW_ROWS(T, NAME)                                                                      \
  SPARSEMOE_ISA_CLONES void NAME(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out, \
                                 int64_t ldo, int64_t rows, int64_t cols, int64_t K) {                  \
    few_rows_impl<T>(a, lda, w, ldw, bias, out, ldo, rows, cols, K);                                     \
  }                                                                                                      \
  SPARSEMOE_ISA_CLONES void NAME##_cm(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias,    \
                                      T* out, int64_t ldo, int64_t rows, int64_t cols, int64_t K,        \
                                      int64_t segments, int64_t segment_stride) {                       \
    few_rows_col_major_impl<T>(a, lda, w, ldw, bias, out, ldo, rows, cols, K, segments, segment_stride); \
  }                                                                                                      \
  template <>                                                                                            \
  void few_rows_gemm<T>(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out,         \
                        int64_t ldo, int64_t rows, int64_t cols, int64_t K) {                            \
    NAME(a, lda, w, ldw, bias, out, ldo, rows, cols, K);                                                 \
  }                                                                                                      \
  template <>                                                                                            \
  void few_rows_gemm_col_major<T>(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias,       \
                                  T* out, int64_t ldo, int64_t rows, int64_t cols, int64_t K,            \
                                  int64_t segments, int64_t segment_stride) {                           \
    NAME##_cm(a, lda, w, ldw, bias, out, ldo, rows, cols, K, segments, segment_stride);                  \
  }

SPARSEMOE_FEW_ROWS(float, few_rows_f32)
SPARSEMOE_FEW_ROWS(double, few_rows_f64)
SPARSEMOE_FEW_ROWS(c10::BFloat16, few_rows_bf16)
SPARSEMOE_FEW_ROWS(c10::Half, few_rows_f16)

}  // namespace sparsemoe
