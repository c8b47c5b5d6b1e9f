// Transposing a matrix into float32 (widening bfloat16 / float16 exactly): the packing of the
// expert weights into the micro-kernel's panels and the backward's transposed operands.
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

}  // namespace sparsemoe
