// Router: softmax over experts, top-k selection, optional renormalisation; and its backward.
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

namespace sparsemoe {
namespace {

void check_route_args(const at::Tensor& logits, int64_t k) {
  check_rank(logits, "logits", 2, "[T, E]");
  check_floating(logits, "logits");
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1, "logits: expected at least one expert (E >= 1), got shape ", shape_str(logits));
  TORCH_CHECK(k >= 1 && k <= E, "k: expected 1 <= k <= E = ", E, ", got ", k);
}

// Widens one row of logits to opmath (into logit, which selection reuses) and writes its
// softmax into p, with torch.softmax's NaN/inf behaviour: a NaN or +inf logit makes the whole
// row NaN (max - max is NaN), so a broken router shows up in the loss.
template <typename scalar_t, typename acc_t>
void softmax_row(const scalar_t* x, int64_t E, acc_t* logit, acc_t* p) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < E; ++i) {
    logit[i] = static_cast<acc_t>(x[i]);
    nan |= std::isnan(logit[i]);
    m = std::max(m, logit[i]);
  }
  if (nan) m = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t s = 0;
  for (int64_t i = 0; i < E; ++i) {
    p[i] = std::exp(logit[i] - m);
    s += p[i];
  }
  for (int64_t i = 0; i < E; ++i) p[i] /= s;
}

// Expert i ranks before expert j: larger logit first, NaN below everything, ties by index.
template <typename acc_t>
struct RanksBefore {
  const acc_t* logit;
  bool operator()(int64_t i, int64_t j) const {
    const acc_t a = logit[i], b = logit[j];
    const bool na = std::isnan(a), nb = std::isnan(b);
    if (na != nb) return nb;
    if (!na && a != b) return a > b;
    return i < j;
  }
};

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits_in, int64_t k, bool renormalize) {
  check_route_args(logits_in, k);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(opmath_dtype(logits.scalar_type())));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    acc_t* w = weights.data_ptr<acc_t>();
    int64_t* id = ids.data_ptr<int64_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(E), lg(E);
      std::vector<int64_t> order(E);
      for (int64_t t = begin; t < end; ++t) {
        softmax_row(x + t * E, E, lg.data(), p.data());
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), RanksBefore<acc_t>{lg.data()});
        acc_t sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += p[order[j]];
        for (int64_t j = 0; j < k; ++j) {
          id[t * k + j] = order[j];
          w[t * k + j] = renormalize ? p[order[j]] / sum : p[order[j]];
        }
      }
    });
  });
  return {weights, ids};
}

// With v the picked probabilities, S their sum and w = v / S (or w = v):
//   dv_j = (gw_j - sum_i gw_i w_i) / S   (or dv_j = gw_j)
//   dlogit_e = p_e * (dv_e - sum_j dv_j v_j), where dv_e is 0 for experts not picked.
at::Tensor route_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                              const at::Tensor& ids_in, bool renormalize) {
  check_rank(logits_in, "logits", 2, "[T, E]");
  check_floating(logits_in, "logits");
  check_rank(ids_in, "expert_ids", 2, "[T, k]");
  check_index(ids_in, "expert_ids");
  check_same_device(logits_in, "logits", ids_in, "expert_ids");
  check_same_device(logits_in, "logits", grad_weights_in, "grad_weights");
  check_size(ids_in, "expert_ids", 0, logits_in.size(0), "T, the tokens of logits");
  TORCH_CHECK(grad_weights_in.sizes() == ids_in.sizes(), "grad_weights: expected shape ",
              shape_str(ids_in), " (the shape of expert_ids), got ", shape_str(grad_weights_in));
  const auto acc_dtype = opmath_dtype(logits_in.scalar_type());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor gw = grad_weights_in.to(acc_dtype).contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  TORCH_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < E),
              "expert_ids: expected ids in [0, ", E, ")");
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const acc_t* g = gw.data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(E), dl(E), dv(k);
      for (int64_t t = begin; t < end; ++t) {
        softmax_row(x + t * E, E, dl.data(), p.data());  // dl is scratch until overwritten below
        const int64_t* rid = id + t * k;
        const acc_t* rg = g + t * k;
        acc_t sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += p[rid[j]];
        acc_t gw_dot_w = 0;
        if (renormalize) {
          for (int64_t j = 0; j < k; ++j) gw_dot_w += rg[j] * (p[rid[j]] / sum);
        }
        acc_t dv_dot_v = 0;
        for (int64_t j = 0; j < k; ++j) {
          dv[j] = renormalize ? (rg[j] - gw_dot_w) / sum : rg[j];
          dv_dot_v += dv[j] * p[rid[j]];
        }
        for (int64_t e = 0; e < E; ++e) dl[e] = -p[e] * dv_dot_v;
        for (int64_t j = 0; j < k; ++j) dl[rid[j]] += p[rid[j]] * dv[j];
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
