// Dispatch: a stable counting sort of (token, pick) pairs by expert, an optional per-expert
// capacity that drops overflowing picks by priority, then one row copy per kept pick.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/large_buffers.h"
#include "cpu/forward_ops.h"
#include "cpu/index_checks.h"
#include "dispatch_checks.h"
#include "ranking.h"

namespace sparsemoe {
namespace {

// The dropless layout: offsets [E+1] and each pick's row in expert-major, token order.
// Pass 1 counts per chunk of tokens; pass 2 starts each chunk at the expert's offset plus the
// counts of earlier chunks, so the result does not depend on the number of threads.
// The chunks' histograms hold chunks * E counters; fewer, longer chunks keep them within
// kHistogramBudget whatever E is (the chunking never depends on the threads).
void stable_sort_by_expert(const int64_t* id, int64_t T, int64_t k, int64_t E, int64_t* off, int64_t* sl) {
  constexpr int64_t kHistogramBudget = int64_t(1) << 22;
  const int64_t chunks = std::clamp<int64_t>((T + 2047) / 2048, 1, std::max<int64_t>(1, kHistogramBudget / E));
  const int64_t grain = std::max<int64_t>(1, (T + chunks - 1) / chunks);
  std::vector<int64_t> next(chunks * E, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* hist = next.data() + c * E;
      for (int64_t i = c * grain * k; i < std::min(T, (c + 1) * grain) * k; ++i) hist[id[i]]++;
    }
  });
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t row = off[e];
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = next[c * E + e];
      next[c * E + e] = row;
      row += count;
    }
    off[e + 1] = row;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* row = next.data() + c * E;
      for (int64_t i = c * grain * k; i < std::min(T, (c + 1) * grain) * k; ++i) sl[i] = row[id[i]]++;
    }
  });
}

// Applies the capacity to the dropless layout (off, sl) in place: each expert keeps at most
// `capacity` picks per token group, by priority (higher first, NaN last, ties to the earlier
// pick) or by position when prio is null. Kept rows stay in token order; dropped picks get -1.
void apply_capacity(int64_t T, int64_t k, int64_t E, int64_t capacity, int64_t groups, const double* prio,
                    int64_t* off, int64_t* sl) {
  const int64_t n = T * k, group_len = T / groups;
  std::vector<int64_t> pick_of_row(n);
  for (int64_t i = 0; i < n; ++i) pick_of_row[sl[i]] = i;
  std::vector<char> keep(n, 1);
  std::vector<int64_t> kept(E, 0);
  const auto before = [prio](int64_t a, int64_t b) { return ranks_before(prio[a], a, prio[b], b); };
  at::parallel_for(0, E, 1, [&](int64_t eb, int64_t ee) {
    std::vector<int64_t> cand;
    for (int64_t e = eb; e < ee; ++e) {
      int64_t r = off[e];
      while (r < off[e + 1]) {  // one token group of this expert at a time
        const int64_t group = pick_of_row[r] / k / group_len;
        int64_t end = r;
        while (end < off[e + 1] && pick_of_row[end] / k / group_len == group) ++end;
        if (end - r > capacity) {
          if (prio == nullptr) {
            std::fill(keep.begin() + r + capacity, keep.begin() + end, 0);
          } else {
            cand.assign(pick_of_row.begin() + r, pick_of_row.begin() + end);
            std::nth_element(cand.begin(), cand.begin() + capacity, cand.end(), before);
            std::fill(keep.begin() + r, keep.begin() + end, 0);
            // Rows of an (expert, group) are in pick order, so a pick's row is r + its rank.
            for (int64_t i = 0; i < capacity; ++i) {
              const int64_t pick = cand[i];
              keep[std::lower_bound(pick_of_row.begin() + r, pick_of_row.begin() + end, pick) -
                   pick_of_row.begin()] = 1;
            }
          }
        }
        r = end;
      }
      for (int64_t row = off[e]; row < off[e + 1]; ++row) kept[e] += keep[row];
    }
  });
  std::vector<int64_t> first(E);
  for (int64_t e = 0; e < E; ++e) first[e] = off[e];
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + kept[e];
  at::parallel_for(0, E, 1, [&](int64_t eb, int64_t ee) {
    for (int64_t e = eb; e < ee; ++e) {
      int64_t row = off[e];
      const int64_t last = e + 1 < E ? first[e + 1] : n;
      for (int64_t r = first[e]; r < last; ++r) sl[pick_of_row[r]] = keep[r] ? row++ : -1;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                            int64_t num_experts, int64_t capacity,
                                                            const c10::optional<at::Tensor>& priority_in,
                                                            int64_t token_groups) {
  const DispatchDims s = check_dispatch_args(x_in, ids_in, num_experts, capacity, priority_in, token_groups);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  check_expert_ids_values(ids, num_experts);

  at::Tensor x_sorted = empty_large({s.N, s.d}, x.options());
  at::Tensor offsets = at::empty({s.E + 1}, ids.options());
  at::Tensor slot = at::empty({s.T, s.k}, ids.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* sl = slot.data_ptr<int64_t>();
  stable_sort_by_expert(ids.data_ptr<int64_t>(), s.T, s.k, s.E, off, sl);
  if (capacity >= 0) {
    const at::Tensor prio = priority_in.has_value() ? priority_in->to(at::kDouble).contiguous() : at::Tensor();
    apply_capacity(s.T, s.k, s.E, capacity, token_groups, prio.defined() ? prio.data_ptr<double>() : nullptr,
                   off, sl);
  }

  const int64_t row_bytes = s.d * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  // Zero-width rows (the planning call of weights_on_input) have no data pointer to copy from.
  if (row_bytes > 0) at::parallel_for(0, s.T, std::max<int64_t>(1, 16384 / s.d), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t row = sl[t * s.k + j];
        if (row >= 0) std::memcpy(dst + row * row_bytes, src + t * row_bytes, row_bytes);
      }
    }
  });
  // Capacity padding past the kept rows is zero, never stale memory.
  if (off[s.E] < s.N) x_sorted.narrow(0, off[s.E], s.N - off[s.E]).zero_();
  return {x_sorted, offsets, slot};
}

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) { m.impl("dispatch", &dispatch_cpu); }

}  // namespace sparsemoe
