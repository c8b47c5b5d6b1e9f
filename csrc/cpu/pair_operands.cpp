// VNNI pairing and bfloat16 transposes for the backward on pairs (cpu/pair_operands.h). Both are
// plain 16-bit moves through vector registers (SSE2, which every x86-64 CPU has; AVX-512 for the
// pairing where the CPU has it): a scalar transpose writes one element per cache line it touches.
#include "cpu/pair_operands.h"

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPARSEMOE_X86_PAIRS 1
#endif

namespace sparsemoe {

#if defined(SPARSEMOE_X86_PAIRS)
namespace {

// 32 pairs per step: the pairs path runs only on CPUs with AVX512-BF16 or AMX, which all have
// AVX512-BW, and twice the SSE2 loop's width kept the pairing of long rows at a copy's speed.
__attribute__((target("avx512f,avx512bw"))) int64_t interleave_avx512(const c10::BFloat16* a,
                                                                     const c10::BFloat16* b, int64_t n,
                                                                     c10::BFloat16* out) {
  alignas(64) int16_t lo[32], hi[32];
  for (int i = 0; i < 32; ++i) {
    lo[i] = static_cast<int16_t>(i / 2 + (i % 2) * 32);  // a[i / 2] or b[i / 2]
    hi[i] = static_cast<int16_t>(16 + i / 2 + (i % 2) * 32);
  }
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512i x = _mm512_loadu_si512(a + c);
    const __m512i y = b != nullptr ? _mm512_loadu_si512(b + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(x, ilo, y));
    _mm512_storeu_si512(out + 2 * c + 32, _mm512_permutex2var_epi16(x, ihi, y));
  }
  return c;
}

bool has_avx512bw() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

}  // namespace
#endif

void interleave_pair(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n, c10::BFloat16* out) {
  int64_t c = 0;
#if defined(SPARSEMOE_X86_PAIRS)
  if (n >= 32 && has_avx512bw()) c = interleave_avx512(a, b, n, out);
  const __m128i zero = _mm_setzero_si128();
  for (; c + 8 <= n; c += 8) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + c));
    const __m128i y = b != nullptr ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c)) : zero;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * c), _mm_unpacklo_epi16(x, y));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * c + 8), _mm_unpackhi_epi16(x, y));
  }
#endif
  for (; c < n; ++c) {
    out[2 * c] = a[c];
    out[2 * c + 1] = b != nullptr ? b[c] : c10::BFloat16(0.0f);
  }
}

void prefetch_once(const c10::BFloat16* p, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t(sizeof(c10::BFloat16)); b += 64) __builtin_prefetch(bytes + b, 0, 0);
#endif
}

void transpose_bf16(const c10::BFloat16* src, int64_t ld_src, int64_t rows, int64_t cols, c10::BFloat16* dst,
                    int64_t ld_dst) {
  int64_t R = 0, C = 0;
#if defined(SPARSEMOE_X86_PAIRS)
  R = rows / 8 * 8;
  C = cols / 8 * 8;
  const auto load = [](const c10::BFloat16* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
  for (int64_t r = 0; r < R; r += 8) {
    for (int64_t c = 0; c < C; c += 8) {
      const c10::BFloat16* s = src + r * ld_src + c;
      const __m128i a0 = load(s), a1 = load(s + ld_src), a2 = load(s + 2 * ld_src), a3 = load(s + 3 * ld_src);
      const __m128i a4 = load(s + 4 * ld_src), a5 = load(s + 5 * ld_src), a6 = load(s + 6 * ld_src),
                    a7 = load(s + 7 * ld_src);
      // Rows interleaved in pairs, then in fours, then the 64-bit halves: each register a column.
      const __m128i t0 = _mm_unpacklo_epi16(a0, a1), t1 = _mm_unpackhi_epi16(a0, a1);
      const __m128i t2 = _mm_unpacklo_epi16(a2, a3), t3 = _mm_unpackhi_epi16(a2, a3);
      const __m128i t4 = _mm_unpacklo_epi16(a4, a5), t5 = _mm_unpackhi_epi16(a4, a5);
      const __m128i t6 = _mm_unpacklo_epi16(a6, a7), t7 = _mm_unpackhi_epi16(a6, a7);
      const __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
      const __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
      const __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
      const __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
      c10::BFloat16* d = dst + c * ld_dst + r;
      const auto store = [](c10::BFloat16* p, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); };
      store(d, _mm_unpacklo_epi64(u0, u4));
      store(d + ld_dst, _mm_unpackhi_epi64(u0, u4));
      store(d + 2 * ld_dst, _mm_unpacklo_epi64(u1, u5));
      store(d + 3 * ld_dst, _mm_unpackhi_epi64(u1, u5));
      store(d + 4 * ld_dst, _mm_unpacklo_epi64(u2, u6));
      store(d + 5 * ld_dst, _mm_unpackhi_epi64(u2, u6));
      store(d + 6 * ld_dst, _mm_unpacklo_epi64(u3, u7));
      store(d + 7 * ld_dst, _mm_unpackhi_epi64(u3, u7));
    }
  }
#endif
  // The edges the 8 x 8 tiles leave: the last columns of the tiled rows, then the last rows whole.
  const auto scalar = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  };
  scalar(0, R, C, cols);
  scalar(R, rows, 0, cols);
}

}  // namespace sparsemoe
