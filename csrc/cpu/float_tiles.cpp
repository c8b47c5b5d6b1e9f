// The epilogue that rounds a float32 tile into its output (cpu/float_tiles.h), compiled as ISA
// clones: the bfloat16 rounding is written as shifts and a select (Elem<T>), which GCC turns into
// vector code.
#include "cpu/float_tiles.h"

#include "cpu/vectorizable.h"

namespace sparsemoe {
namespace {

template <typename T>
SPARSEMOE_INLINE void store_tile_impl(const float* tile, int64_t n, int64_t w, const T* bias, T* out, int64_t ldo,
                                      int64_t col_step) {
  for (int64_t r = 0; r < n; ++r) {
    const float* t = tile + r * w;
    T* o = out + r * ldo;
    if (col_step == 1 && bias != nullptr) {
      for (int64_t c = 0; c < w; ++c) Elem<T>::store(o + c, t[c] + Elem<T>::load(bias + c));
    } else if (col_step == 1) {
      for (int64_t c = 0; c < w; ++c) Elem<T>::store(o + c, t[c]);
    } else {
      for (int64_t c = 0; c < w; ++c) {
        Elem<T>::store(o + c * col_step, t[c] + (bias != nullptr ? Elem<T>::load(bias + c * col_step) : 0.0f));
      }
    }
  }
}

}  // namespace

#define SPARSEMOE_STORE_TILE(T, NAME)                                                                          \
  SPARSEMOE_ISA_CLONES void NAME(const float* tile, int64_t n, int64_t w, const T* bias, T* out, int64_t ldo, \
                                 int64_t col_step) {                                                          \
    store_tile_impl<T>(tile, n, w, bias, out, ldo, col_step);                                                 \
  }                                                                                                           \
  template <>                                                                                                 \
  void store_tile<T>(const float* tile, int64_t n, int64_t w, const T* bias, T* out, int64_t ldo,            \
                     int64_t col_step) {                                                                      \
    NAME(tile, n, w, bias, out, ldo, col_step);                                                               \
  }

SPARSEMOE_STORE_TILE(float, store_tile_f32)
SPARSEMOE_STORE_TILE(c10::BFloat16, store_tile_bf16)
SPARSEMOE_STORE_TILE(c10::Half, store_tile_f16)

}  // namespace sparsemoe
