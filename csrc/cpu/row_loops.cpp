// The row loops of cpu/row_loops.h, one ISA-cloned entry point per storage type.
#include "cpu/row_loops.h"

#include "cpu/vectorizable.h"

namespace sparsemoe {
namespace {

template <typename T, typename A>
SPARSEMOE_INLINE void weighted_rows_sum_impl(const T* __restrict__ y, int64_t d, const int64_t* slots, const A* w,
                                             int64_t k, A* __restrict__ acc, T* __restrict__ out) {
  for (int64_t i = 0; i < d; ++i) acc[i] = A(0);
  for (int64_t j = 0; j < k; ++j) {
    if (slots[j] < 0) continue;
    const A wj = w != nullptr ? w[j] : A(1);
    const T* __restrict__ row = y + slots[j] * d;
    for (int64_t i = 0; i < d; ++i) acc[i] += wj * Elem<T>::load(row + i);
  }
  for (int64_t i = 0; i < d; ++i) Elem<T>::store(out + i, acc[i]);
}

template <typename T, typename A>
SPARSEMOE_INLINE void scaled_row_impl(const T* __restrict__ x, int64_t d, A w, T* __restrict__ out) {
  for (int64_t i = 0; i < d; ++i) Elem<T>::store(out + i, w * Elem<T>::load(x + i));
}

template <typename T, typename A>
SPARSEMOE_INLINE A row_dot_impl(const T* __restrict__ a, const T* __restrict__ b, int64_t d) {
  constexpr int64_t kLanes = 16;
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) part[j] += Elem<T>::load(a + i + j) * Elem<T>::load(b + i + j);
  }
  A sum = A(0);
  for (int64_t j = 0; j < kLanes; ++j) sum += part[j];
  for (; i < d; ++i) sum += Elem<T>::load(a + i) * Elem<T>::load(b + i);
  return sum;
}

}  // namespace

#define SPARSEMOE_ROW_LOOPS(T, A, NAME)                                                                        \
  SPARSEMOE_ISA_CLONES void NAME##_sum(const T* y, int64_t d, const int64_t* slots, const A* w, int64_t k,     \
                                       A* acc, T* out) {                                                      \
    weighted_rows_sum_impl<T, A>(y, d, slots, w, k, acc, out);                                                \
  }                                                                                                           \
  SPARSEMOE_ISA_CLONES void NAME##_scale(const T* x, int64_t d, A w, T* out) { scaled_row_impl<T, A>(x, d, w, out); } \
  SPARSEMOE_ISA_CLONES A NAME##_dot(const T* a, const T* b, int64_t d) { return row_dot_impl<T, A>(a, b, d); } \
  template <>                                                                                                 \
  void weighted_rows_sum<T, A>(const T* y, int64_t d, const int64_t* slots, const A* w, int64_t k, A* acc,     \
                               T* out) {                                                                      \
    NAME##_sum(y, d, slots, w, k, acc, out);                                                                  \
  }                                                                                                           \
  template <>                                                                                                 \
  void scaled_row<T, A>(const T* x, int64_t d, A w, T* out) {                                                 \
    NAME##_scale(x, d, w, out);                                                                               \
  }                                                                                                           \
  template <>                                                                                                 \
  A row_dot<T, A>(const T* a, const T* b, int64_t d) {                                                        \
    return NAME##_dot(a, b, d);                                                                               \
  }

SPARSEMOE_ROW_LOOPS(float, float, rows_f32)
SPARSEMOE_ROW_LOOPS(double, double, rows_f64)
SPARSEMOE_ROW_LOOPS(c10::BFloat16, float, rows_bf16)
SPARSEMOE_ROW_LOOPS(c10::Half, float, rows_f16)

}  // namespace sparsemoe
