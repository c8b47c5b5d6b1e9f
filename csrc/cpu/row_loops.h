// The per-token row loops of combine and of its backward companions (scatter_rows, slot_dot),
// compiled as ISA clones (cpu/vectorizable.h): with c10's scalar bfloat16 conversions they ran
// one element at a time, and combine took as long as dispatch's row copies and the router.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace sparsemoe {

// out [d] = sum over j < k with slots[j] >= 0 of w[j] * y[slots[j] * d : +d] (w null: weight 1),
// accumulated in acc [d] (float32; float64 for double) in j order and rounded once.
template <typename T, typename A>
void weighted_rows_sum(const T* y, int64_t d, const int64_t* slots, const A* w, int64_t k, A* acc, T* out);

// out [d] = w * x [d], rounded once.
template <typename T, typename A>
void scaled_row(const T* x, int64_t d, A w, T* out);

// sum of a [d] * b [d] in A, in a fixed order (16 interleaved partial sums, then the tail), so
// the result depends only on the two rows.
template <typename T, typename A>
A row_dot(const T* a, const T* b, int64_t d);

}  // namespace sparsemoe
