"""The machine's own arithmetic peak, measured: a loop of independent fused multiply-adds (and, where
the CPU has AVX512-BF16, of `vdpbf16ps` bfloat16 dot products; where it has AMX, of `tdpbf16ps`
tile products) on one thread and on all threads. The benchmark tables divide achieved GFLOP/s by
these numbers (bfloat16 by the AMX peak where there is one: that is what its GEMMs run on).

    python benchmarks/peak_probe.py        # prints the peaks

The loop is compiled here for the host CPU (-march=native) with torch's C++ extension builder.
"""

from __future__ import annotations

import functools
import time

import torch

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

// One fused multiply-add per vector lane per instruction, written with the intrinsics so the
// compiler cannot split it into a multiply and an add.
#if defined(__AVX512F__)
constexpr int kWidth = 16;
typedef __m512 vec;
static inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec splat(float v) { return _mm512_set1_ps(v); }
static inline float total(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__FMA__)
constexpr int kWidth = 8;
typedef __m256 vec;
static inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec splat(float v) { return _mm256_set1_ps(v); }
static inline float total(vec v) {
  float t[8];
  _mm256_storeu_ps(t, v);
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#else
#error "the peak probe needs FMA (x86-64 with AVX2 or AVX-512)"
#endif
constexpr int kAcc = 12;  // independent chains: enough to cover the FMA latency on every port

// FLOPs done: 2 * kWidth * kAcc * iters.
float fma_loop(int64_t iters) {
  vec acc[kAcc];
  const vec m = splat(0.999999f), a = splat(1e-7f);
  for (int j = 0; j < kAcc; ++j) acc[j] = splat((float)j);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j) acc[j] = fmadd(acc[j], m, a);
  }
  float s = 0;
  for (int j = 0; j < kAcc; ++j) s += total(acc[j]);
  return s;
}

// FLOPs done: 2 * 32 * kAcc * iters (32 bf16 products per 512-bit vdpbf16ps).
float bf16_loop(int64_t iters) {
#if defined(__AVX512BF16__)
  __m512 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_set1_ps((float)j);
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  }
  float s = 0;
  for (int j = 0; j < kAcc; ++j) s += _mm512_reduce_add_ps(acc[j]);
  return s;
#else
  return -1.0f;
#endif
}

// FLOPs done: 4 * 2 * 16 * 16 * 32 * iters (four 16 x 16 tiles of C, each a 16 x 32 by 32 x 16
// bf16 product per tdpbf16ps).
#if defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
__attribute__((target("amx-tile,amx-bf16"))) float amx_loop(int64_t iters) {
  // Linux hands out the tile data state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return -1.0f;
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  alignas(64) static thread_local uint16_t a[16 * 32], b[16 * 32];
  alignas(64) static thread_local float c[16 * 16];
  for (int i = 0; i < 16 * 32; ++i) a[i] = b[i] = 0x3380;  // small bf16 values: no overflow
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, a, 64); _tile_loadd(5, a, 64); _tile_loadd(6, b, 64); _tile_loadd(7, b, 64);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_release();
  return c[0];
}
bool has_amx() { return true; }
#else
float amx_loop(int64_t) { return -1.0f; }
bool has_amx() { return false; }
#endif

bool has_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

int64_t width() { return kWidth; }

// Runs the loop on `threads` threads at once (each `iters` iterations); returns seconds.
double run(int64_t which, int64_t iters, int64_t threads) {
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) sink[t] = which == 0 ? fma_loop(iters) : which == 1 ? bf16_loop(iters) : amx_loop(iters);
  });
  const auto t1 = std::chrono::steady_clock::now();
  volatile float keep = sink[0];
  (void)keep;
  return std::chrono::duration<double>(t1 - t0).count();
}
"""


@functools.lru_cache(maxsize=1)
def _module():
    from torch.utils.cpp_extension import load_inline
    return load_inline("sparsemoe_peak_probe", _SOURCE, functions=["run", "has_bf16", "has_amx", "width"],
                       # -fopenmp: at::parallel_for is inline OpenMP code, serial without it.
                       extra_cflags=["-O2", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)


def peaks(seconds: float = 0.3) -> dict[str, float | None]:
    """GFLOP/s: fp32 FMA, bf16 dot-product and AMX bf16 tile peaks, one thread and all of torch's
    threads (the best of 3 timings each; None where the CPU has no such instruction)."""
    m = _module()
    threads = torch.get_num_threads()
    out: dict[str, float | None] = {}
    for which, name, flops_per_iter in ((0, "fp32", 2 * m.width() * 12), (1, "bf16", 2 * 32 * 12),
                                        (2, "amx", 4 * 2 * 16 * 16 * 32)):
        if (which == 1 and not m.has_bf16()) or (which == 2 and (not m.has_amx() or m.run(2, 1, 1) < 0)):
            out[f"{name}_1"] = out[f"{name}_all"] = None
            continue
        iters = 1 << 16
        while m.run(which, iters, 1) < seconds / 3:
            iters *= 2
        for n, key in ((1, f"{name}_1"), (threads, f"{name}_all")):
            best = min(m.run(which, iters, n) for _ in range(3))
            out[key] = flops_per_iter * iters * n / best / 1e9
    return out


if __name__ == "__main__":
    t = time.perf_counter()
    p = peaks()
    for key, value in p.items():
        print(f"{key}: {'n/a' if value is None else f'{value:.1f} GFLOP/s'}")
    print(f"(threads {torch.get_num_threads()}, {time.perf_counter() - t:.1f} s)")
