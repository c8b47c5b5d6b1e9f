// Moves between the kernels' buffers and the float32 operands and tiles of the GEMM micro-kernel
// (cpu/packed_weights.h): widening bfloat16 / float16 exactly, transposing, and rounding a float32
// tile once into its output.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/to_float.h"

namespace sparsemoe {

// rows x width values (row stride ld) as float32 with row stride `width`: the values themselves
// when they are float32 and ld == width, else widened into `scratch`.
template <typename T>
const float* float_rows(const T* rows, int64_t ld, int64_t n, int64_t width, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    if (ld == width) return rows;
  }
  scratch.resize(static_cast<size_t>(n * width));
  for (int64_t r = 0; r < n; ++r) widen_to_float<T>(rows + r * ld, width, scratch.data() + r * width);
  return scratch.data();
}

// dst [cols, rows] (row-major) = src [rows, cols]^T as float32, src with row stride ld.
template <typename T>
const float* float_transposed(const T* src, int64_t ld, int64_t rows, int64_t cols, std::vector<float>& scratch) {
  scratch.resize(static_cast<size_t>(rows * cols));
  transpose_to_float<T>(src, ld, rows, cols, scratch.data(), rows);
  return scratch.data();
}

// out[r, c * col_step] = tile[r, c] + bias[c * col_step] (bias may be null), rounded to T, for n
// rows of w columns: col_step 2 writes every other column (interleaved gate / up). Vectorised
// (cpu/float_tiles.cpp): it is the epilogue of every packed block, and a scalar bfloat16 rounding
// cost a third of a bf16 forward whose GEMMs run on AMX.
template <typename T>
void store_tile(const float* tile, int64_t n, int64_t w, const T* bias, T* out, int64_t ldo, int64_t col_step);

}  // namespace sparsemoe
