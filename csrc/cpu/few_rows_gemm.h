// out = a @ w^T (+ bias) for a handful of rows: one dot product per (row, output column), each
// weight row read once from memory for all the rows. Decoding gives experts one or two tokens;
// the BLAS would first pack the whole weight block for them, which for so few rows costs more
// memory traffic than the product, and decoding is bound by reading the weights.
#pragma once

#include <cstdint>

namespace sparsemoe {

// Rows up to which the expert FFN takes this path instead of the BLAS.
constexpr int64_t kFewRows = 4;

// out[r, j] = bias[j] + sum_k a[r, k] * w[j, k] for r < rows, j < cols, accumulated in float
// (double for double) and rounded once. bias may be null. Row strides lda, ldw, ldo.
template <typename T>
void few_rows_gemm(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out, int64_t ldo,
                   int64_t rows, int64_t cols, int64_t K);

}  // namespace sparsemoe
