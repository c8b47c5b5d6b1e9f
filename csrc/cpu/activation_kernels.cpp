#include "cpu/activation_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/vectorizable.h"

namespace sparsemoe {
namespace {

// exp for float with a few ulp of error and no branches or calls, so the loops vectorise (the
// libm call would not). The polynomial runs on the argument clamped to [-87, 88], where 2^n is a
// normal float; past log(FLT_MAX) the result is +inf, as exp's, so that sigmoid(-x) is 0 and
// silu(x) is x * 0 for large negative x (and NaN at -inf, as torch gives). Below -87 the result
// stays exp(-87), which no sum 1 + e can tell from 0. NaN stays NaN.
SPARSEMOE_INLINE float exp_approx(float x) {
  const bool nan = x != x;
  const bool overflow = x > 88.72283935546875f;  // log(FLT_MAX)
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  x = nan ? 0.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_as<float>(static_cast<int32_t>((static_cast<int32_t>(n) + 127) << 23));
  const float e = overflow ? std::numeric_limits<float>::infinity() : p * scale;
  return nan ? std::numeric_limits<float>::quiet_NaN() : e;
}
SPARSEMOE_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename A>
SPARSEMOE_INLINE A sigmoid(A x) {
  return A(1) / (A(1) + exp_approx(-x));
}

// The math of each activation in the accumulation type A, as torch.nn.functional defines it.
// rnd rounds to the storage type wherever eager PyTorch materialises an intermediate tensor
// (the identity for float and double), so bfloat16 and float16 results are bitwise those of
// the unfused ATen ops and of the reference: fusing saves the memory passes, not the roundings.
template <typename A, typename Round>
struct Math {
  A alpha, limit;
  Round rnd;
  A lowest;  // the most negative finite value of the storage type

  // a = silu(g) * u
  SPARSEMOE_INLINE A swiglu(A g, A u) const { return rnd(g * sigmoid(g)) * u; }
  // grad_g = silu_backward(grad_a * u, g), grad_u = grad_a * silu(g)
  SPARSEMOE_INLINE void swiglu_grad(A ga, A g, A u, A& gg, A& gu, A& a) const {
    const A s = sigmoid(g);
    const A silu = rnd(g * s);
    gg = rnd(ga * u) * s * (A(1) + g * (A(1) - s));
    gu = ga * silu;
    a = silu * u;
  }
  // GPT-OSS: gate clamped above at limit, up to [-limit, limit]; clamps pass the gradient inside
  // the closed range and give exactly 0 outside it (a select, as torch.clamp's backward: an
  // overflowed or NaN gradient outside the range is dropped, not multiplied by 0 into NaN).
  // a = (up + 1) * (gate * sigmoid(gate * alpha))
  SPARSEMOE_INLINE A clamped(A g, A u) const {
    const A gc = g < limit ? g : (g != g ? g : limit);
    const A uc = u < -limit ? -limit : (u > limit ? limit : u);
    return rnd(uc + A(1)) * rnd(gc * rnd(sigmoid(rnd(gc * alpha))));
  }
  SPARSEMOE_INLINE void clamped_grad(A ga, A g, A u, A& gg, A& gu, A& a) const {
    const A gc = g < limit ? g : (g != g ? g : limit);
    const A uc = u < -limit ? -limit : (u > limit ? limit : u);
    const A ga_alpha = rnd(gc * alpha);
    const A s = rnd(sigmoid(ga_alpha));
    const A glu = rnd(gc * s);
    const A up1 = rnd(uc + A(1));
    // Every value is computed, then selected: a rounding (a store and a load) inside a
    // conditional would keep GCC from vectorising the loop.
    const A gu_inside = rnd(ga * glu);
    gu = std::abs(u) <= limit ? gu_inside : A(0);
    // d glu / d gate = s * (1 + alpha*gate*(1 - s)). For a finite gate alpha*gate can overflow
    // to -inf where s is exactly 0 (0 * inf): bounding it at the storage type's lowest finite
    // value keeps that product 0 (and its roundings finite). The factor gate - gate + 1 is
    // exactly 1 for a finite gate and NaN for an infinite one, as exact math has it. (A select
    // here would stop the loop vectorising.)
    const A bounded = std::max(ga_alpha, lowest);
    const A dglu = rnd(s * rnd(A(1) + rnd(bounded * rnd(A(1) - s)))) * (gc - gc + A(1));
    const A gg_inside = rnd(rnd(ga * up1) * dglu);
    gg = g <= limit ? gg_inside : A(0);
    a = up1 * glu;
  }
  SPARSEMOE_INLINE A silu(A h) const { return h * sigmoid(h); }
  SPARSEMOE_INLINE A silu_grad(A ga, A h, A& a) const {
    const A s = sigmoid(h);
    a = h * s;
    return ga * s * (A(1) + h * (A(1) - s));
  }
  SPARSEMOE_INLINE A gelu(A h) const { return A(0.5) * h * (A(1) + std::erf(h * A(M_SQRT1_2))); }
  SPARSEMOE_INLINE A gelu_grad(A ga, A h, A& a) const {
    const A cdf = A(0.5) * (A(1) + std::erf(h * A(M_SQRT1_2)));
    const A pdf = std::exp(A(-0.5) * h * h) * A(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    a = h * cdf;
    return ga * (cdf + h * pdf);
  }
  static constexpr double kBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
  static constexpr double kKappa = 0.044715;
  SPARSEMOE_INLINE A gelu_tanh(A h) const {
    return A(0.5) * h * (A(1) + std::tanh(A(kBeta) * (h + A(kKappa) * h * h * h)));
  }
  SPARSEMOE_INLINE A gelu_tanh_grad(A ga, A h, A& a) const {
    const A t = std::tanh(A(kBeta) * (h + A(kKappa) * h * h * h));
    a = A(0.5) * h * (A(1) + t);
    // Where tanh has saturated, sech^2 is exactly 0 and so is this term; h^2 is bounded at the
    // largest finite value so that a finite h never makes it 0 * inf (at h = +-inf it stays NaN,
    // as exact math gives).
    const A sech2 = A(1) - t * t;
    const A h2 = std::min(h * h, std::numeric_limits<A>::max());
    const A right = A(0.5) * h * sech2 * A(kBeta) * (A(1) + A(3 * kKappa) * h2);
    return ga * (A(0.5) * (A(1) + t) + right);
  }
  SPARSEMOE_INLINE A relu(A h) const { return h != h ? h : (h > A(0) ? h : A(0)); }
  // threshold_backward: zero where h <= 0, the gradient elsewhere (NaN h passes it).
  SPARSEMOE_INLINE A relu_grad(A ga, A h, A& a) const {
    a = relu(h);
    return h <= A(0) ? A(0) : ga;
  }
};

// Rounds a math value through storage type T and back.
template <typename T>
struct RoundTo {
  SPARSEMOE_INLINE typename Elem<T>::acc operator()(typename Elem<T>::acc v) const {
    T t;
    Elem<T>::store(&t, v);
    return Elem<T>::load(&t);
  }
};
template <>
struct RoundTo<float> {
  SPARSEMOE_INLINE float operator()(float v) const { return v; }
};
template <>
struct RoundTo<double> {
  SPARSEMOE_INLINE double operator()(double v) const { return v; }
};

// Row loops, one per activation kind, with the kind fixed at compile time so the inner loop is a
// straight line of arithmetic.
template <typename T, typename F>
SPARSEMOE_INLINE void gated_forward(ActIn<T> h, ActOut<T> a, int64_t rows, int64_t cols, F f) {
  using E = Elem<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ g = h.gate + r * h.ld;
    const T* __restrict__ u = h.up + r * h.ld;
    T* __restrict__ out = a.gate + r * a.ld;
    for (int64_t c = 0; c < cols; ++c) E::store(out + c, f(E::load(g + c), E::load(u + c)));
  }
}

template <typename T, typename F>
SPARSEMOE_INLINE void plain_forward(ActIn<T> h, ActOut<T> a, int64_t rows, int64_t cols, F f) {
  using E = Elem<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ x = h.gate + r * h.ld;
    T* __restrict__ out = a.gate + r * a.ld;
    for (int64_t c = 0; c < cols; ++c) E::store(out + c, f(E::load(x + c)));
  }
}

// The gradient loop leaves out a = act(h): with a third output stream GCC no longer vectorises
// it, so a is recomputed by the forward loop on the same (cached) rows instead.
template <typename T, typename F, typename Fwd>
SPARSEMOE_INLINE void gated_backward(const T* grad_a, int64_t ldga, ActIn<T> h, ActOut<T> gh, ActOut<T> a,
                                     int64_t rows, int64_t cols, F f, Fwd fwd) {
  using E = Elem<T>;
  using A = typename E::acc;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ ga = grad_a + r * ldga;
    const T* __restrict__ g = h.gate + r * h.ld;
    const T* __restrict__ u = h.up + r * h.ld;
    T* __restrict__ gg_out = gh.gate + r * gh.ld;
    T* __restrict__ gu_out = gh.up + r * gh.ld;
    for (int64_t c = 0; c < cols; ++c) {
      A gg, gu, av;
      f(E::load(ga + c), E::load(g + c), E::load(u + c), gg, gu, av);
      E::store(gg_out + c, gg);
      E::store(gu_out + c, gu);
    }
  }
  if (a.gate != nullptr) gated_forward(h, a, rows, cols, fwd);
}

template <typename T, typename F>
SPARSEMOE_INLINE void plain_backward(const T* grad_a, int64_t ldga, ActIn<T> h, ActOut<T> gh, ActOut<T> a,
                                     int64_t rows, int64_t cols, F f) {
  using E = Elem<T>;
  using A = typename E::acc;
  for (int64_t r = 0; r < rows; ++r) {
    const T* ga = grad_a + r * ldga;
    const T* x = h.gate + r * h.ld;
    T* g_out = gh.gate + r * gh.ld;
    T* a_out = a.gate != nullptr ? a.gate + r * a.ld : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      A av;
      E::store(g_out + c, f(E::load(ga + c), E::load(x + c), av));
      if (a_out != nullptr) E::store(a_out + c, av);
    }
  }
}

// PyTorch compares and clamps a tensor against the limit in the tensor's own dtype (the scalar
// is rounded to it), while it multiplies by alpha in float.
template <typename T>
SPARSEMOE_INLINE Math<typename Elem<T>::acc, RoundTo<T>> make_math(const ActivationSpec& act) {
  using A = typename Elem<T>::acc;
  return {A(act.alpha), RoundTo<T>{}(A(act.limit)), {}, A(std::numeric_limits<T>::lowest())};
}

template <typename T>
SPARSEMOE_INLINE void forward_impl(const ActivationSpec& act, ActIn<T> h, ActOut<T> a, int64_t rows, int64_t cols) {
  using A = typename Elem<T>::acc;
  const Math<A, RoundTo<T>> m = make_math<T>(act);
  switch (act.kind) {
    case Activation::SwiGLU: return gated_forward(h, a, rows, cols, [&](A g, A u) { return m.swiglu(g, u); });
    case Activation::ClampedSwiGLU:
      return gated_forward(h, a, rows, cols, [&](A g, A u) { return m.clamped(g, u); });
    case Activation::SiLU: return plain_forward(h, a, rows, cols, [&](A x) { return m.silu(x); });
    case Activation::GELU: return plain_forward(h, a, rows, cols, [&](A x) { return m.gelu(x); });
    case Activation::GELUTanh: return plain_forward(h, a, rows, cols, [&](A x) { return m.gelu_tanh(x); });
    case Activation::ReLU: return plain_forward(h, a, rows, cols, [&](A x) { return m.relu(x); });
  }
}

template <typename T>
SPARSEMOE_INLINE void backward_impl(const ActivationSpec& act, const T* grad_a, int64_t ldga, ActIn<T> h,
                                    ActOut<T> gh, ActOut<T> a, int64_t rows, int64_t cols) {
  using A = typename Elem<T>::acc;
  const Math<A, RoundTo<T>> m = make_math<T>(act);
  switch (act.kind) {
    case Activation::SwiGLU:
      return gated_backward(
          grad_a, ldga, h, gh, a, rows, cols,
          [&](A ga, A g, A u, A& gg, A& gu, A& av) { m.swiglu_grad(ga, g, u, gg, gu, av); },
          [&](A g, A u) { return m.swiglu(g, u); });
    case Activation::ClampedSwiGLU:
      return gated_backward(
          grad_a, ldga, h, gh, a, rows, cols,
          [&](A ga, A g, A u, A& gg, A& gu, A& av) { m.clamped_grad(ga, g, u, gg, gu, av); },
          [&](A g, A u) { return m.clamped(g, u); });
    case Activation::SiLU:
      return plain_backward(grad_a, ldga, h, gh, a, rows, cols, [&](A ga, A x, A& av) { return m.silu_grad(ga, x, av); });
    case Activation::GELU:
      return plain_backward(grad_a, ldga, h, gh, a, rows, cols, [&](A ga, A x, A& av) { return m.gelu_grad(ga, x, av); });
    case Activation::GELUTanh:
      return plain_backward(grad_a, ldga, h, gh, a, rows, cols,
                            [&](A ga, A x, A& av) { return m.gelu_tanh_grad(ga, x, av); });
    case Activation::ReLU:
      return plain_backward(grad_a, ldga, h, gh, a, rows, cols, [&](A ga, A x, A& av) { return m.relu_grad(ga, x, av); });
  }
}

// Assignments copy the elements' bits, NaN payloads included; GCC turns the loops into shuffles.
template <typename T>
SPARSEMOE_INLINE void split_impl(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ s = src + r * lds;
    T* __restrict__ gate = dst + r * ldd;
    T* __restrict__ up = gate + cols;
    for (int64_t c = 0; c < cols; ++c) {
      gate[c] = s[2 * c];
      up[c] = s[2 * c + 1];
    }
  }
}

template <typename T>
SPARSEMOE_INLINE void interleave_impl(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ gate = src + r * lds;
    const T* __restrict__ up = gate + cols;
    T* __restrict__ d = dst + r * ldd;
    for (int64_t c = 0; c < cols; ++c) {
      d[2 * c] = gate[c];
      d[2 * c + 1] = up[c];
    }
  }
}

}  // namespace

// One ISA-cloned entry point per storage type; the templates above inline into each clone.
#define SPARSEMOE_ACTIVATION_ENTRIES(T, NAME)                                                             \
  SPARSEMOE_ISA_CLONES void NAME##_forward(const ActivationSpec& act, ActIn<T> h, ActOut<T> a, int64_t rows, \
                                           int64_t cols) {                                                \
    forward_impl<T>(act, h, a, rows, cols);                                                               \
  }                                                                                                       \
  SPARSEMOE_ISA_CLONES void NAME##_backward(const ActivationSpec& act, const T* grad_a, int64_t ldga,       \
                                            ActIn<T> h, ActOut<T> gh, ActOut<T> a, int64_t rows,           \
                                            int64_t cols) {                                               \
    backward_impl<T>(act, grad_a, ldga, h, gh, a, rows, cols);                                            \
  }                                                                                                       \
  template <>                                                                                             \
  void activation_forward_block<T>(const ActivationSpec& act, ActIn<T> h, ActOut<T> a, int64_t rows,      \
                                   int64_t cols) {                                                        \
    NAME##_forward(act, h, a, rows, cols);                                                                \
  }                                                                                                       \
  template <>                                                                                             \
  void activation_backward_block<T>(const ActivationSpec& act, const T* grad_a, int64_t ldga, ActIn<T> h, \
                                    ActOut<T> gh, ActOut<T> a, int64_t rows, int64_t cols) {              \
    NAME##_backward(act, grad_a, ldga, h, gh, a, rows, cols);                                             \
  }

#define SPARSEMOE_GATE_UP_ENTRIES(T, NAME)                                                                 \
  SPARSEMOE_ISA_CLONES void NAME##_split(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,     \
                                         int64_t cols) {                                                    \
    split_impl<T>(src, lds, dst, ldd, rows, cols);                                                          \
  }                                                                                                         \
  SPARSEMOE_ISA_CLONES void NAME##_interleave(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, \
                                              int64_t cols) {                                               \
    interleave_impl<T>(src, lds, dst, ldd, rows, cols);                                                     \
  }                                                                                                         \
  template <>                                                                                               \
  void split_gate_up<T>(const T* interleaved, int64_t ld_interleaved, T* halves, int64_t ld_halves,         \
                        int64_t rows, int64_t cols) {                                                       \
    NAME##_split(interleaved, ld_interleaved, halves, ld_halves, rows, cols);                               \
  }                                                                                                         \
  template <>                                                                                               \
  void interleave_gate_up<T>(const T* halves, int64_t ld_halves, T* interleaved, int64_t ld_interleaved,    \
                             int64_t rows, int64_t cols) {                                                  \
    NAME##_interleave(halves, ld_halves, interleaved, ld_interleaved, rows, cols);                          \
  }

SPARSEMOE_GATE_UP_ENTRIES(float, moves_f32)
SPARSEMOE_GATE_UP_ENTRIES(double, moves_f64)
SPARSEMOE_GATE_UP_ENTRIES(c10::BFloat16, moves_bf16)
SPARSEMOE_GATE_UP_ENTRIES(c10::Half, moves_f16)

SPARSEMOE_ACTIVATION_ENTRIES(float, act_f32)
SPARSEMOE_ACTIVATION_ENTRIES(double, act_f64)
SPARSEMOE_ACTIVATION_ENTRIES(c10::BFloat16, act_bf16)
SPARSEMOE_ACTIVATION_ENTRIES(c10::Half, act_f16)

}  // namespace sparsemoe
