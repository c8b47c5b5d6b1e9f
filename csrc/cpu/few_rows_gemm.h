// out = a @ w^T (+ bias) for a handful of rows: each weight element read once from memory for
// all the rows. Decoding gives experts one or two tokens; the BLAS would first pack the whole
// weight block for them, which for so few rows costs more memory traffic than the product, and
// decoding is bound by reading the weights.
#pragma once

#include <cstdint>

namespace sparsemoe {

// Rows up to which the expert FFN takes this path instead of the BLAS.
constexpr int64_t kFewRows = 4;

// out[r, j] = bias[j] + sum_k a[r, k] * w[j, k] for r < rows, j < cols, accumulated in float
// (double for double) and rounded once. bias may be null. Row strides lda, ldw, ldo: w is
// row-major, w[j, k] at w[j * ldw + k], and each output is one dot product.
template <typename T>
void few_rows_gemm(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out, int64_t ldo,
                   int64_t rows, int64_t cols, int64_t K);

// The same product for a column-major w, w[j, k] at w[k * ldw + j] (the expert weights Hugging
// Face stores transposed): weight row k is read once, contiguously, and added into every row's
// accumulators, so the loads stay unit-stride instead of striding by ldw inside a dot product.
// The output columns are `segments` (1 or 2) runs of `cols`, run s starting at column
// s * segment_stride of w, bias and out: the gate and up halves of a block, computed in one pass
// over w's rows, which keeps the reads of each weight row together.
constexpr int64_t kMaxSegments = 2;
template <typename T>
void few_rows_gemm_col_major(const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias, T* out,
                             int64_t ldo, int64_t rows, int64_t cols, int64_t K, int64_t segments,
                             int64_t segment_stride);

}  // namespace sparsemoe
