#include "cpu/few_rows_gemm.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

}  // namespace

#define SPARSEMOE_FEW_ROWS(T, NAME)                                                                      \
  SPARSEMOE_ISA_CLONES void NAME(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out, \
                                 int64_t ldo, int64_t rows, int64_t cols, int64_t K) {                  \
    few_rows_impl<T>(a, lda, w, ldw, bias, out, ldo, rows, cols, K);                                     \
  }                                                                                                      \
  template <>                                                                                            \
  void few_rows_gemm<T>(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out,         \
                        int64_t ldo, int64_t rows, int64_t cols, int64_t K) {                            \
    NAME(a, lda, w, ldw, bias, out, ldo, rows, cols, K);                                                 \
  }

SPARSEMOE_FEW_ROWS(float, few_rows_f32)
SPARSEMOE_FEW_ROWS(double, few_rows_f64)
SPARSEMOE_FEW_ROWS(c10::BFloat16, few_rows_bf16)
SPARSEMOE_FEW_ROWS(c10::Half, few_rows_f16)

}  // namespace sparsemoe
