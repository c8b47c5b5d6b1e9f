// Dispatch: a stable counting sort of (token, pick) pairs by expert, then one row copy each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/index_checks.h"

namespace sparsemoe {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& x_in,
                                                            const at::Tensor& ids_in,
                                                            int64_t num_experts) {
  check_rank(x_in, "x", 2, "[T, d]");
  check_floating(x_in, "x");
  check_rank(ids_in, "expert_ids", 2, "[T, k]");
  check_index(ids_in, "expert_ids");
  check_same_device(x_in, "x", ids_in, "expert_ids");
  check_size(ids_in, "expert_ids", 0, x_in.size(0), "T, the tokens of x");
  TORCH_CHECK(num_experts >= 1, "num_experts: expected >= 1, got ", num_experts);
  TORCH_CHECK(ids_in.size(1) >= 1 && ids_in.size(1) <= num_experts, "expert_ids: expected k = size(1) in [1, ",
              num_experts, "], got shape ", shape_str(ids_in));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  check_expert_ids_values(ids, num_experts);

  const int64_t T = x.size(0), d = x.size(1), k = ids.size(1), E = num_experts;
  const int64_t N = T * k;
  at::Tensor x_sorted = at::empty({N, d}, x.options());
  at::Tensor offsets = at::empty({E + 1}, ids.options());
  at::Tensor slot = at::empty({T, k}, ids.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* sl = slot.data_ptr<int64_t>();

  // Pass 1: a histogram per chunk of tokens. Pass 2: each chunk's first row per expert is the
  // expert's offset plus the counts of earlier chunks, so rows keep token order in an expert
  // and the result does not depend on the number of threads.
  const int64_t grain = 2048;
  const int64_t chunks = std::max<int64_t>(1, (T + grain - 1) / grain);
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

  const int64_t row_bytes = d * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      for (int64_t j = 0; j < k; ++j) std::memcpy(dst + sl[t * k + j] * row_bytes, src + t * row_bytes, row_bytes);
    }
  });
  return {x_sorted, offsets, slot};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) { m.impl("dispatch", &dispatch_cpu); }

}  // namespace sparsemoe
