#include "cpu/few_rows_gemm.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

// Compiled for AVX-512 and AVX2 besides the baseline and picked at load time, as the activations.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEMOE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPARSEMOE_ISA_CLONES
#endif

namespace sparsemoe {
namespace {

template <typename T>
struct Widen {
  using acc = float;
  static inline float get(const T* p) { return static_cast<float>(*p); }
};
template <>
struct Widen<double> {
  using acc = double;
  static inline double get(const double* p) { return *p; }
};
template <>
struct Widen<c10::BFloat16> {
  using acc = float;
  // The plain shift vectorises; c10's conversion goes through a function call.
  static inline float get(const c10::BFloat16* p) {
    const uint32_t bits = uint32_t(p->x) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
};

template <typename T>
inline __attribute__((always_inline)) void few_rows_impl(const T* a, int64_t lda, const T* w, int64_t ldw,
                                                         const T* bias, T* out, int64_t ldo, int64_t rows,
                                                         int64_t cols, int64_t K) {
  using A = typename Widen<T>::acc;
  for (int64_t j = 0; j < cols; ++j) {
    const T* wj = w + j * ldw;
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = a + r * lda;
      A acc = 0;
      // The reduction order is the simd lanes', fixed for a given build and CPU.
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += Widen<T>::get(ar + k) * Widen<T>::get(wj + k);
      if (bias != nullptr) acc += Widen<T>::get(bias + j);
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
