// Router math for one token row, shared by the route kernels: scoring, the picked weights and
// their gradient. Everything runs in the opmath type acc_t (float, or double for double).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>

namespace sparsemoe {

// softmax: over all experts (Mixtral, Qwen, OLMoE, Switch); sigmoid: per expert (DeepSeek-V3,
// Llama-4); softmax_topk: pick on the logits, softmax over the k picked logits (GPT-OSS).
enum class Scoring { Softmax, Sigmoid, SoftmaxTopK };

inline Scoring parse_scoring(const std::string& name) {
  if (name == "softmax") return Scoring::Softmax;
  if (name == "sigmoid") return Scoring::Sigmoid;
  if (name == "softmax_topk") return Scoring::SoftmaxTopK;
  TORCH_CHECK(false, "scoring: expected one of 'softmax', 'sigmoid', 'softmax_topk', got '", name, "'");
}

// Keeps renormalisation finite when every picked sigmoid score underflows (DeepSeek-V3's
// epsilon); far below one ulp of any softmax sum, so it never changes a softmax weight.
template <typename acc_t>
constexpr acc_t kRenormEps = static_cast<acc_t>(1e-20);

// In-place softmax with torch.softmax's NaN/inf behaviour: a NaN or +inf input makes the whole
// result NaN (max - max is NaN), so a broken router shows up in the loss.
template <typename acc_t>
void softmax_inplace(acc_t* v, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan |= std::isnan(v[i]);
    m = std::max(m, v[i]);
  }
  if (nan) m = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = std::exp(v[i] - m);
    s += v[i];
  }
  for (int64_t i = 0; i < n; ++i) v[i] /= s;
}

// Widens one row of logits into logit and writes the per-expert scores into score (the logits
// themselves for softmax_topk, whose softmax runs over the picked experts only).
template <typename scalar_t, typename acc_t>
void score_row(const scalar_t* x, int64_t E, Scoring scoring, acc_t* logit, acc_t* score) {
  for (int64_t e = 0; e < E; ++e) logit[e] = static_cast<acc_t>(x[e]);
  std::copy(logit, logit + E, score);
  if (scoring == Scoring::Softmax) {
    softmax_inplace(score, E);
  } else if (scoring == Scoring::Sigmoid) {
    for (int64_t e = 0; e < E; ++e) score[e] = acc_t(1) / (acc_t(1) + std::exp(-logit[e]));
  }
}

// The picked experts' values before renormalisation: their scores, or the softmax of their
// logits for softmax_topk.
template <typename acc_t>
void picked_values(const acc_t* score, const int64_t* ids, int64_t k, Scoring scoring, acc_t* v) {
  for (int64_t j = 0; j < k; ++j) v[j] = score[ids[j]];
  if (scoring == Scoring::SoftmaxTopK) softmax_inplace(v, k);
}

// w_j = scale * v_j / (sum v + eps) with renormalize, else scale * v_j.
template <typename acc_t>
void picked_weights(const acc_t* score, const int64_t* ids, int64_t k, Scoring scoring, bool renormalize,
                    acc_t scale, acc_t* w) {
  picked_values(score, ids, k, scoring, w);
  acc_t denom = 1;
  if (renormalize) {
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += w[j];
    denom = sum + kRenormEps<acc_t>;
  }
  for (int64_t j = 0; j < k; ++j) w[j] = renormalize ? scale * (w[j] / denom) : scale * w[j];
}

// d logits (dl [E]) from d weights (gw [k]). With g = scale * gw and S = sum v + eps:
//   dv_j = (g_j - sum_i g_i v_i / S) / S  with renormalize, else g_j;
//   softmax:      dl_e = p_e * (dv_e - sum_j dv_j v_j), dv_e = 0 for experts not picked;
//   sigmoid:      dl_{id_j} = dv_j * v_j * (1 - v_j), 0 elsewhere;
//   softmax_topk: dl_{id_j} = v_j * (dv_j - sum_i dv_i v_i), 0 elsewhere.
template <typename acc_t>
void picked_weights_backward(const acc_t* score, const int64_t* ids, const acc_t* gw, int64_t k, int64_t E,
                             Scoring scoring, bool renormalize, acc_t scale, acc_t* dl) {
  constexpr int64_t kStack = 64;
  acc_t v_stack[kStack], dv_stack[kStack];
  std::unique_ptr<acc_t[]> heap;
  acc_t* v = v_stack;
  acc_t* dv = dv_stack;
  if (k > kStack) {
    heap.reset(new acc_t[2 * k]);
    v = heap.get();
    dv = heap.get() + k;
  }
  picked_values(score, ids, k, scoring, v);
  acc_t S = 1, g_dot_w = 0;
  if (renormalize) {
    S = kRenormEps<acc_t>;
    for (int64_t j = 0; j < k; ++j) S += v[j];
    for (int64_t j = 0; j < k; ++j) g_dot_w += scale * gw[j] * (v[j] / S);
  }
  acc_t dv_dot_v = 0;
  for (int64_t j = 0; j < k; ++j) {
    dv[j] = renormalize ? (scale * gw[j] - g_dot_w) / S : scale * gw[j];
    dv_dot_v += dv[j] * v[j];
  }
  std::fill(dl, dl + E, acc_t(0));
  switch (scoring) {
    case Scoring::Softmax:
      for (int64_t e = 0; e < E; ++e) dl[e] = -score[e] * dv_dot_v;
      for (int64_t j = 0; j < k; ++j) dl[ids[j]] += v[j] * dv[j];
      break;
    case Scoring::Sigmoid:
      for (int64_t j = 0; j < k; ++j) dl[ids[j]] = dv[j] * v[j] * (acc_t(1) - v[j]);
      break;
    case Scoring::SoftmaxTopK:
      for (int64_t j = 0; j < k; ++j) dl[ids[j]] = v[j] * (dv[j] - dv_dot_v);
      break;
  }
}

}  // namespace sparsemoe
