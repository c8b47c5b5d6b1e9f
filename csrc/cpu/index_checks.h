// Value checks on index tensors that live in host memory. They read the data, so they belong
// to the CPU kernels; the message names the argument, the row and the offending value.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace sparsemoe {

// Each row of ids [T,k] must hold k distinct experts in [0, E).
inline void check_expert_ids_values(const at::Tensor& ids, int64_t E) {
  const int64_t T = ids.size(0), k = ids.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  // Each chunk records its first bad row; the lowest one is reported, whatever the threads.
  const int64_t grain = 1024;
  const int64_t chunks = (T + grain - 1) / grain;
  std::vector<int64_t> bad_row(chunks, -1), bad_val(chunks, 0);
  std::vector<char> repeated(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<int64_t> seen(E, -1);
    for (int64_t c = cb; c < ce; ++c) {
      for (int64_t t = c * grain; t < std::min(T, (c + 1) * grain) && bad_row[c] < 0; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = id[t * k + j];
          if (e < 0 || e >= E || seen[e] == t) {
            bad_row[c] = t;
            bad_val[c] = e;
            repeated[c] = (e >= 0 && e < E);
            break;
          }
          seen[e] = t;
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    if (bad_row[c] < 0) continue;
    TORCH_CHECK(!repeated[c], "expert_ids: row ", bad_row[c], " picks expert ", bad_val[c],
                " more than once; each token's k experts must be distinct");
    TORCH_CHECK(false, "expert_ids: expected ids in [0, ", E, "), row ", bad_row[c], " has ",
                bad_val[c]);
  }
}

// Slots [T,k] must be -1 (dropped) or a row in [0, num_rows), and no row may appear twice: each
// buffer row belongs to at most one pick, which is what lets the backward of combine and slot_dot
// (scatter_rows) write each row once, with no race and no sum.
inline void check_slot_values(const at::Tensor& slot, int64_t num_rows) {
  if (slot.numel() == 0) return;
  const int64_t n = slot.numel();
  const int64_t* sl = slot.data_ptr<int64_t>();
  int64_t lo = sl[0], hi = sl[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, sl[i]);
    hi = std::max(hi, sl[i]);
  }
  TORCH_CHECK(lo >= -1 && hi < num_rows, "slot: expected values in [-1, ", num_rows,
              ") (-1 marks a dropped pick), got values in [", lo, ", ", hi, "]");
  std::vector<char> used(num_rows, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (sl[i] < 0) continue;
    TORCH_CHECK(!used[sl[i]], "slot: expected distinct rows (each buffer row belongs to one pick), row ", sl[i],
                " appears twice");
    used[sl[i]] = 1;
  }
}

// Offsets [E+1] must start at 0, never decrease and end at most at num_rows (rows past the
// last offset are capacity padding). Returns the last offset.
inline int64_t check_offsets_values(const at::Tensor& offsets, int64_t num_rows) {
  const int64_t n = offsets.numel();
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, "expert_offsets: expected offsets[0] == 0, got ", o[0]);
  for (int64_t e = 0; e + 1 < n; ++e) {
    TORCH_CHECK(o[e] <= o[e + 1], "expert_offsets: expected non-decreasing offsets, got offsets[",
                e, "] = ", o[e], " > offsets[", e + 1, "] = ", o[e + 1]);
  }
  TORCH_CHECK(o[n - 1] <= num_rows, "expert_offsets: expected the last offset to be at most the ",
              num_rows, " rows of x_sorted, got ", o[n - 1]);
  return o[n - 1];
}

}  // namespace sparsemoe
