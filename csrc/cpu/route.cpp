// Router: scoring (softmax / sigmoid / top-k-then-softmax), optional selection bias and
// group-limited choice, top-k, optional renormalisation and scaling; and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "checks.h"
#include "cpu/forward_ops.h"
#include "cpu/index_checks.h"
#include "ranking.h"
#include "route_checks.h"
#include "routing.h"

namespace sparsemoe {
namespace {

// Expert i ranks before expert j by their keys (ranking.h).
template <typename acc_t>
struct RanksBefore {
  const acc_t* key;
  bool operator()(int64_t i, int64_t j) const { return ranks_before(key[i], i, key[j], j); }
};

// Per-thread scratch for one row.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> logit, score, key, group_score;
  std::vector<int64_t> order, group_order, chosen_groups;
  explicit RowScratch(int64_t E, int64_t G)
      : logit(E), score(E), key(E), group_score(G), order(E), group_order(G), chosen_groups(G) {}
};

// The k candidates that rank first, best first, into out [k] (k <= n): one pass that keeps the
// best k so far in order. The order is total, so this is exactly what a partial sort gives; most
// candidates fail the one compare against the k-th best, where a heap-based partial sort of 128
// experts took as long as the softmax before it.
template <typename Before>
void top_k_of(const int64_t* cand, int64_t n, int64_t k, const Before& before, int64_t* out) {
  int64_t held = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = cand[i];
    if (held == k && !before(e, out[k - 1])) continue;
    int64_t j = held < k ? held++ : k - 1;
    for (; j > 0 && before(e, out[j - 1]); --j) out[j] = out[j - 1];
    out[j] = e;
  }
}

// Picks the k experts of one row into ids (best first). key holds the choice values.
template <typename acc_t>
void select_row(RowScratch<acc_t>& s, int64_t E, const RouteOptions& o, int64_t* ids) {
  const RanksBefore<acc_t> before{s.key.data()};
  std::iota(s.order.begin(), s.order.end(), 0);
  if (o.num_groups == 1) return top_k_of(s.order.data(), E, o.k, before, ids);
  // Group score: the sum of the group's two best choice values (one when a group has one).
  const int64_t per = E / o.num_groups;
  const int64_t best = std::min<int64_t>(2, per);
  for (int64_t g = 0; g < o.num_groups; ++g) {
    int64_t top[2];
    top_k_of(s.order.data() + g * per, per, best, before, top);
    acc_t sum = 0;
    for (int64_t i = 0; i < best; ++i) sum += s.key[top[i]];
    s.group_score[g] = sum;
  }
  std::iota(s.group_order.begin(), s.group_order.end(), 0);
  top_k_of(s.group_order.data(), o.num_groups, o.topk_groups, RanksBefore<acc_t>{s.group_score.data()},
           s.chosen_groups.data());
  // Gather the chosen groups' experts, then take the k best of them.
  int64_t n = 0;
  for (int64_t i = 0; i < o.topk_groups; ++i) {
    for (int64_t e = s.chosen_groups[i] * per; e < (s.chosen_groups[i] + 1) * per; ++e) s.order[n++] = e;
  }
  top_k_of(s.order.data(), n, o.k, before, ids);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits_in, int64_t k, bool renormalize,
                                             c10::string_view scoring,
                                             const c10::optional<at::Tensor>& bias_in, int64_t num_groups,
                                             int64_t topk_groups, double scale) {
  const RouteOptions o = check_route_args(logits_in, k, scoring, renormalize, bias_in, num_groups,
                                          topk_groups, scale);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_dtype = opmath_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(acc_dtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  const bool has_bias = bias_in.has_value();
  const at::Tensor bias = has_bias ? bias_in->to(acc_dtype).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const acc_t* b = has_bias ? bias.data_ptr<acc_t>() : nullptr;
    acc_t* w = weights.data_ptr<acc_t>();
    int64_t* id = ids.data_ptr<int64_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> s(E, o.num_groups);
      std::vector<acc_t> picked(k);
      for (int64_t t = begin; t < end; ++t) {
        score_row(x + t * E, E, o.scoring, s.logit.data(), s.score.data());
        // Scores are monotone in the logits, so without a bias or groups the logits rank the
        // experts the same way and stay apart where softmax underflows or sigmoid saturates.
        const acc_t* choice = (b == nullptr && o.num_groups == 1) ? s.logit.data() : s.score.data();
        for (int64_t e = 0; e < E; ++e) s.key[e] = b ? choice[e] + b[e] : choice[e];
        int64_t* row_ids = id + t * k;
        select_row(s, E, o, row_ids);
        picked_weights(s.score.data(), row_ids, k, o.scoring, o.renormalize, static_cast<acc_t>(o.scale),
                       picked.data());
        std::copy(picked.begin(), picked.end(), w + t * k);
      }
    });
  });
  return {weights, ids};
}

namespace {

at::Tensor route_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                              const at::Tensor& ids_in, bool renormalize, c10::string_view scoring_name,
                              double scale) {
  const Scoring scoring = check_route_backward_args(grad_weights_in, logits_in, ids_in, scoring_name);
  const auto acc_dtype = opmath_dtype(logits_in.scalar_type());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor gw = grad_weights_in.to(acc_dtype).contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  check_expert_ids_values(ids, E);
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const acc_t* g = gw.data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> logit(E), score(E), dl(E);
      for (int64_t t = begin; t < end; ++t) {
        score_row(x + t * E, E, scoring, logit.data(), score.data());
        picked_weights_backward(score.data(), id + t * k, g + t * k, k, E, scoring, renormalize,
                                static_cast<acc_t>(scale), dl.data());
        for (int64_t e = 0; e < E; ++e) out[t * E + e] = static_cast<scalar_t>(dl[e]);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace sparsemoe
