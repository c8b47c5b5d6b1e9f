// Router on CUDA: one warp per token row. The warp reads its row of logits once into a per-warp
// buffer (shared memory, or a global scratch row when E is too wide), then computes scores,
// group scores and the k picks from that buffer with warp shuffles. Every pick is a warp argmax
// under the total ranking order, so all lanes agree on each winner and the result does not
// depend on the launch shape.
//
// routing.h holds the same math as serial per-row loops (std::exp, std::fill, heap scratch) for
// one CPU thread per row; here each of those loops is split across the 32 lanes and reduced with
// shuffles, so only its Scoring enum, parse_scoring and kRenormEps are shared.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cuda/device_utils.cuh"
#include "route_checks.h"
#include "routing.h"

namespace sparsemoe {
namespace {

using cuda::kWarpSize;

// Expert indices are ints inside the kernels.
void check_expert_count(const at::Tensor& logits) {
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int>::max(), "logits: expected at most ",
              std::numeric_limits<int>::max(), " experts, got shape ", shape_str(logits));
}

// Softmax statistics of a row (max and sum of exp(l - max)); unused by the other scorings.
template <typename acc_t>
struct RowStats {
  acc_t max, sum;
};

template <typename acc_t>
__device__ __forceinline__ acc_t score_of(acc_t logit, Scoring scoring, RowStats<acc_t> st) {
  switch (scoring) {
    case Scoring::Softmax:
      return cuda::exp_op(logit - st.max) / st.sum;
    case Scoring::Sigmoid:
      return acc_t(1) / (acc_t(1) + cuda::exp_op(-logit));
    default:
      return logit;
  }
}

// Widens the row into buf (lane-strided) and, for softmax, reduces its statistics with
// torch.softmax's NaN behaviour: a NaN or +inf logit makes every score NaN.
template <typename scalar_t, typename acc_t>
__device__ RowStats<acc_t> load_row(const scalar_t* __restrict__ row, int E, int lane, Scoring scoring,
                                    acc_t* buf) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int e = lane; e < E; e += kWarpSize) {
    const acc_t l = static_cast<acc_t>(row[e]);
    buf[e] = l;
    nan |= cuda::is_nan(l);
    mx = l > mx ? l : mx;
  }
  RowStats<acc_t> st{acc_t(0), acc_t(1)};
  if (scoring != Scoring::Softmax) return st;
  st.max = cuda::warp_max(mx);
  if (__any_sync(cuda::kFullMask, nan)) st.max = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t s = 0;
  for (int e = lane; e < E; e += kWarpSize) s += cuda::exp_op(buf[e] - st.max);
  st.sum = cuda::warp_sum(s);
  return st;
}

// Softmax over v[0..n) in place, lane-strided: each lane touches only its own entries.
template <typename acc_t>
__device__ void softmax_lanes(acc_t* v, int n, int lane) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int j = lane; j < n; j += kWarpSize) {
    nan |= cuda::is_nan(v[j]);
    mx = v[j] > mx ? v[j] : mx;
  }
  mx = cuda::warp_max(mx);
  if (__any_sync(cuda::kFullMask, nan)) mx = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t s = 0;
  for (int j = lane; j < n; j += kWarpSize) s += cuda::exp_op(v[j] - mx);
  s = cuda::warp_sum(s);
  for (int j = lane; j < n; j += kWarpSize) v[j] = cuda::exp_op(v[j] - mx) / s;
}

struct RouteParams {
  int E, k, num_groups, topk_groups;
  Scoring scoring;
  bool renormalize;
};

// Group-limited choice: writes 1 into flag[g] for the topk_groups groups with the largest sum of
// their two best choice values (key) and 0 for the others.
template <typename acc_t>
__device__ void mark_chosen_groups(const acc_t* key, acc_t* flag, const RouteParams& p, int lane) {
  const int per = p.E / p.num_groups;
  for (int g = lane; g < p.num_groups; g += kWarpSize) {
    acc_t v1 = 0, v2 = 0;
    int i1 = -1, i2 = -1;
    for (int e = g * per; e < (g + 1) * per; ++e) {
      const acc_t v = key[e];
      if (i1 < 0 || ranks_before(v, e, v1, i1)) {
        v2 = v1, i2 = i1, v1 = v, i1 = e;
      } else if (i2 < 0 || ranks_before(v, e, v2, i2)) {
        v2 = v, i2 = e;
      }
    }
    acc_t sum = 0;
    sum += v1;
    if (i2 >= 0) sum += v2;
    flag[g] = sum;
  }
  __syncwarp();
  // topk_groups rounds of "best group ranking after the previous winner".
  acc_t last_v = 0;
  int last_g = -1;
  for (int r = 0; r < p.topk_groups; ++r) {
    acc_t bv = 0;
    int bi = -1;
    for (int g = lane; g < p.num_groups; g += kWarpSize) {
      const acc_t v = flag[g];
      if ((last_g < 0 || ranks_before(last_v, last_g, v, g)) && (bi < 0 || ranks_before(v, g, bv, bi))) {
        bv = v, bi = g;
      }
    }
    cuda::warp_arg_best(bv, bi);
    last_v = bv, last_g = bi;
  }
  // A group is chosen when it ranks no lower than the last winner.
  for (int g = lane; g < p.num_groups; g += kWarpSize) {
    flag[g] = (g == last_g || ranks_before(flag[g], g, last_v, last_g)) ? acc_t(1) : acc_t(0);
  }
  __syncwarp();
}

// One warp per row; each warp owns a buffer of E + num_groups opmath values.
template <typename scalar_t, typename acc_t>
__global__ void route_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ bias, int64_t T,
                             RouteParams p, acc_t scale, acc_t eps, acc_t* scratch, acc_t* __restrict__ weights,
                             int64_t* __restrict__ ids) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int64_t stride = int64_t(p.E) + p.num_groups;
  const int64_t warp_id = int64_t(blockIdx.x) * warps + warp;
  acc_t* key = scratch != nullptr ? scratch + warp_id * stride : reinterpret_cast<acc_t*>(shared_raw) + warp * stride;
  acc_t* group_flag = key + p.E;
  const int per = p.E / p.num_groups;
  // Without a bias or groups the logits rank the experts like the scores do and stay apart where
  // softmax underflows or sigmoid saturates; otherwise score + bias ranks them.
  const bool rank_scores = bias != nullptr || p.num_groups > 1;

  for (int64_t row = warp_id; row < T; row += int64_t(gridDim.x) * warps) {
    const scalar_t* x = logits + row * p.E;
    const RowStats<acc_t> st = load_row(x, p.E, lane, p.scoring, key);
    if (rank_scores) {
      for (int e = lane; e < p.E; e += kWarpSize) {
        const acc_t s = score_of(key[e], p.scoring, st);
        key[e] = bias != nullptr ? s + bias[e] : s;
      }
    }
    __syncwarp();
    if (p.num_groups > 1) mark_chosen_groups(key, group_flag, p, lane);

    // Round r picks the best eligible expert ranking after the winner of round r - 1. The lane
    // that later finishes weight r stores its unnormalised value.
    acc_t* w = weights + row * p.k;
    int64_t* id = ids + row * p.k;
    acc_t prev_v = 0;
    int prev_e = -1;
    for (int r = 0; r < p.k; ++r) {
      acc_t bv = 0;
      int be = -1;
      for (int e = lane; e < p.E; e += kWarpSize) {
        if (p.num_groups > 1 && group_flag[e / per] == acc_t(0)) continue;
        const acc_t v = key[e];
        if ((prev_e < 0 || ranks_before(prev_v, prev_e, v, e)) && (be < 0 || ranks_before(v, e, bv, be))) {
          bv = v, be = e;
        }
      }
      cuda::warp_arg_best(bv, be);
      CUDA_KERNEL_ASSERT(be >= 0);
      if (be < 0) be = 0;
      prev_v = bv, prev_e = be;
      if (lane == r % kWarpSize) {
        id[r] = be;
        w[r] = score_of(static_cast<acc_t>(x[be]), p.scoring, st);
      }
    }

    // Weights: softmax over the picks for softmax_topk, renormalisation, scale.
    if (p.scoring == Scoring::SoftmaxTopK) softmax_lanes(w, p.k, lane);
    acc_t denom = 1;
    if (p.renormalize) {
      acc_t s = 0;
      for (int j = lane; j < p.k; j += kWarpSize) s += w[j];
      denom = cuda::warp_sum(s) + eps;
    }
    for (int j = lane; j < p.k; j += kWarpSize) w[j] = p.renormalize ? scale * (w[j] / denom) : scale * w[j];
    __syncwarp();  // the buffer is rewritten for the next row
  }
}

// d logits from d weights, the derivative of picked_weights in routing.h. One warp per row; each
// warp owns a buffer of E + k opmath values (the row, then its gradient; the picked values).
template <typename scalar_t, typename acc_t>
__global__ void route_backward_kernel(const acc_t* __restrict__ grad_weights, const scalar_t* __restrict__ logits,
                                      const int64_t* __restrict__ ids, int64_t T, int E, int k, Scoring scoring,
                                      bool renormalize, acc_t scale, acc_t eps, acc_t* scratch,
                                      scalar_t* __restrict__ grad) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int64_t stride = int64_t(E) + k;
  const int64_t warp_id = int64_t(blockIdx.x) * warps + warp;
  acc_t* buf = scratch != nullptr ? scratch + warp_id * stride : reinterpret_cast<acc_t*>(shared_raw) + warp * stride;
  acc_t* v = buf + E;

  for (int64_t row = warp_id; row < T; row += int64_t(gridDim.x) * warps) {
    const RowStats<acc_t> st = load_row(logits + row * E, E, lane, scoring, buf);
    __syncwarp();
    const int64_t* id = ids + row * k;
    const acc_t* gw = grad_weights + row * k;
    for (int j = lane; j < k; j += kWarpSize) {
      const int64_t e = id[j];
      CUDA_KERNEL_ASSERT(e >= 0 && e < E);
      v[j] = (e >= 0 && e < E) ? score_of(buf[e], scoring, st) : acc_t(0);
    }
    if (scoring == Scoring::SoftmaxTopK) softmax_lanes(v, k, lane);
    // With g = scale * gw and S = sum v + eps: dv_j = (g_j - sum_i g_i v_i / S) / S, or g_j.
    acc_t S = 1, g_dot_w = 0;
    if (renormalize) {
      acc_t s = 0;
      for (int j = lane; j < k; j += kWarpSize) s += v[j];
      S = cuda::warp_sum(s) + eps;
      acc_t gd = 0;
      for (int j = lane; j < k; j += kWarpSize) gd += scale * gw[j] * (v[j] / S);
      g_dot_w = cuda::warp_sum(gd);
    }
    const auto dv_of = [&](int j) { return renormalize ? (scale * gw[j] - g_dot_w) / S : scale * gw[j]; };
    acc_t dvv = 0;
    for (int j = lane; j < k; j += kWarpSize) dvv += dv_of(j) * v[j];
    const acc_t dv_dot_v = cuda::warp_sum(dvv);
    __syncwarp();  // every lane has read the row's scores at the picked experts

    for (int e = lane; e < E; e += kWarpSize) {
      buf[e] = scoring == Scoring::Softmax ? -score_of(buf[e], scoring, st) * dv_dot_v : acc_t(0);
    }
    __syncwarp();
    // The picked experts in pick order by one lane, as the CPU kernel does, so repeated ids
    // (which route never produces) still give one fixed result.
    if (lane == 0) {
      for (int j = 0; j < k; ++j) {
        const int64_t e = id[j];
        if (e < 0 || e >= E) continue;
        const acc_t dv = dv_of(j);
        switch (scoring) {
          case Scoring::Softmax: buf[e] += v[j] * dv; break;
          case Scoring::Sigmoid: buf[e] = dv * v[j] * (acc_t(1) - v[j]); break;
          case Scoring::SoftmaxTopK: buf[e] = v[j] * (dv - dv_dot_v); break;
        }
      }
    }
    __syncwarp();
    scalar_t* out = grad + row * E;
    for (int e = lane; e < E; e += kWarpSize) out[e] = static_cast<scalar_t>(buf[e]);
    __syncwarp();  // the buffer is rewritten for the next row
  }
}

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits_in, int64_t k, bool renormalize,
                                              c10::string_view scoring, const std::optional<at::Tensor>& bias_in,
                                              int64_t num_groups, int64_t topk_groups, double scale) {
  const RouteOptions o =
      check_route_args(logits_in, k, scoring, renormalize, bias_in, num_groups, topk_groups, scale);
  check_expert_count(logits_in);
  cuda::OpContext ctx(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_dtype = opmath_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(acc_dtype));
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  if (T == 0) return {weights, ids};
  const at::Tensor bias = bias_in.has_value() ? bias_in->to(acc_dtype).contiguous() : at::Tensor();
  const RouteParams p{static_cast<int>(E), static_cast<int>(k), static_cast<int>(o.num_groups),
                      static_cast<int>(o.topk_groups), o.scoring, o.renormalize};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t buffer = E + o.num_groups;
    const cuda::WarpRowLaunch l = cuda::warp_row_launch(T, buffer * int64_t(sizeof(acc_t)));
    const at::Tensor scratch = at::empty({l.scratch_warps() * buffer}, logits.options().dtype(acc_dtype));
    route_kernel<scalar_t, acc_t><<<l.blocks, l.warps * kWarpSize, l.shared_bytes, ctx.stream>>>(
        logits.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<acc_t>() : nullptr, T, p,
        static_cast<acc_t>(o.scale), kRenormEps<acc_t>, l.global_scratch ? scratch.data_ptr<acc_t>() : nullptr,
        weights.data_ptr<acc_t>(), ids.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, ids};
}

at::Tensor route_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                               const at::Tensor& ids_in, bool renormalize, c10::string_view scoring_name,
                               double scale) {
  const Scoring scoring = check_route_backward_args(grad_weights_in, logits_in, ids_in, scoring_name);
  check_expert_count(logits_in);
  cuda::OpContext ctx(logits_in);
  const auto acc_dtype = opmath_dtype(logits_in.scalar_type());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor gw = grad_weights_in.to(acc_dtype).contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  at::Tensor grad = at::empty_like(logits);
  if (T == 0 || E == 0) return grad;
  TORCH_CHECK(k <= std::numeric_limits<int>::max(), "expert_ids: expected at most ",
              std::numeric_limits<int>::max(), " picks per token, got shape ", shape_str(ids));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t buffer = E + k;
    const cuda::WarpRowLaunch l = cuda::warp_row_launch(T, buffer * int64_t(sizeof(acc_t)));
    const at::Tensor scratch = at::empty({l.scratch_warps() * buffer}, logits.options().dtype(acc_dtype));
    route_backward_kernel<scalar_t, acc_t><<<l.blocks, l.warps * kWarpSize, l.shared_bytes, ctx.stream>>>(
        gw.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), T, static_cast<int>(E),
        static_cast<int>(k), scoring, renormalize, static_cast<acc_t>(scale), kRenormEps<acc_t>,
        l.global_scratch ? scratch.data_ptr<acc_t>() : nullptr, grad.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsemoe, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_cuda);
}

}  // namespace sparsemoe
