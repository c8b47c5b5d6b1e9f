// Moving bfloat16 / float16 / float32 values into float32 for the GEMM micro-kernel, widening
// exactly: transposed (the packing of the expert weights into panels, the backward's transposed
// operands) or in order (the rows and panels a block multiplies).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace sparsemoe {

// dst[c * ld_dst + r] = float(src[r * ld_src + c]) for r < rows, c < cols. 8 x 8 tiles go
// through AVX2 registers where the CPU has AVX2 (checked at run time; the library itself is
// built for baseline x86-64), the rest element by element. T: float, bfloat16, float16 (double
// only rounds, element by element).
template <typename T>
void transpose_to_float(const T* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst);

// dst[i] = float(src[i]) for i < n, eight at a time where the CPU has AVX2.
template <typename T>
void widen_to_float(const T* src, int64_t n, float* dst);

}  // namespace sparsemoe
