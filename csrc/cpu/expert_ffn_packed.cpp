// Forward blocks on packed panels: each block multiplies its expert's rows, in chunks, by its
// panels with the micro-kernel into a float32 tile, and the epilogue adds the bias and rounds
// into the output while the tile is in L1. On plain panels bfloat16 and float16 rows are widened
// to float32 per chunk, and their panels slice by slice as they are used; on panels in pairs the
// native bf16 kernel reads both as they are. Either way the products are exact and accumulate
// in float32, as in a bfloat16 GEMM, and each output is rounded once.
#include "cpu/expert_ffn_packed.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/float_tiles.h"
#include "cpu/hidden_block.h"

namespace sparsemoe {
namespace {

// Rows per micro-kernel call: a chunk's widened rows and its output tile stay in L2 with the panel.
constexpr int64_t kChunkRows = 128;

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// float32 outputs without a bias need no epilogue: the micro-kernel writes them in place.
template <typename T>
constexpr bool kInPlace = std::is_same_v<T, float>;

// Reductions of a bfloat16 / float16 panel widened at a time: a 64-column slice is then 32 KiB of
// float32, read by the micro-kernel from L1 right after it is written. Widening whole panels
// (128 KiB of float32) beside the chunk's rows crowded L2 and cost 15-20% of the forward.
constexpr int64_t kWidenDepth = 128;

// out [n, w] (row stride ldo) = A [n, K] @ panel [K, w]: float32 panels in place, others widened
// slice by slice, each slice's product added to the last.
template <typename T>
void gemm_on_panel(int64_t n, int64_t w, int64_t K, const float* A, int64_t lda, const T* panel, float* out,
                   int64_t ldo, std::vector<float>& slice) {
  if constexpr (std::is_same_v<T, float>) {
    panel_gemm(n, w, K, A, lda, panel, w, out, ldo, false);
  } else {
    slice.resize(static_cast<size_t>(kWidenDepth * w));
    for (int64_t k0 = 0; k0 < K; k0 += kWidenDepth) {
      const int64_t kk = std::min(kWidenDepth, K - k0);
      widen_to_float<T>(panel + k0 * w, kk * w, slice.data());
      panel_gemm(n, w, kk, A + k0, lda, slice.data(), w, out, ldo, /*accumulate=*/k0 > 0);
    }
  }
}

// The block's rows as the pairs kernel reads them: in place when the reduction is even, else
// copied with the zero that pairs them with the panels' padding.
const c10::BFloat16* paired_rows(const c10::BFloat16* rows, int64_t ld, int64_t n, int64_t K, int64_t kp,
                                 std::vector<c10::BFloat16>& scratch) {
  if (K == kp) return rows;
  scratch.assign(static_cast<size_t>(n * kp), c10::BFloat16(0.0f));
  for (int64_t r = 0; r < n; ++r) std::copy(rows + r * ld, rows + r * ld + K, scratch.data() + r * kp);
  return scratch.data();
}

// A block's rows [n, K] (row stride ld) times its panels, either way the layout stores them:
// widened to float32 once per chunk for plain panels, in place (bf16) for panels in pairs.
template <typename T>
struct PanelRows {
  const float* f = nullptr;
  const c10::BFloat16* pairs = nullptr;
  int64_t ld = 0;

  PanelRows(const T* rows, int64_t ld_rows, int64_t n, int64_t K, const PackedLayout& L, int64_t kp,
            std::vector<float>& scratch_f, std::vector<c10::BFloat16>& scratch_p) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (L.pairs) {
        pairs = paired_rows(rows, ld_rows, n, K, kp, scratch_p);
        ld = K == kp ? ld_rows : kp;
        return;
      }
    }
    f = float_rows<T>(rows, ld_rows, n, K, scratch_f);
    ld = K;
  }

  // out [n, w] (row stride ldo) = rows @ panel [K, w].
  void gemm(int64_t n, int64_t w, int64_t K, int64_t kp, const T* panel, float* out, int64_t ldo,
            std::vector<float>& slice) const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (pairs != nullptr) return pairs_gemm(n, w, kp, pairs, ld, panel, w, out, ldo, false);
    }
    gemm_on_panel<T>(n, w, K, f, ld, panel, out, ldo, slice);
  }
};

}  // namespace

template <typename T>
void packed_gemm1_block(const PackedFfn& p, const Block& b) {
  const FfnDims& s = p.s;
  const PackedLayout& L = p.layout;
  const bool il = p.gate_up_interleaved;
  thread_local std::vector<float> rows_f, slice, tile;
  thread_local std::vector<c10::BFloat16> rows_p;
  tile.resize(static_cast<size_t>(kChunkRows * L.pw1));
  const T* Pe = p.packed.data_ptr<T>() + b.e * L.per_expert();
  const T* bias1 = ptr_or_null<T>(p.b1);
  for (int64_t r = 0; r < b.n; r += kChunkRows) {
    const int64_t n = std::min(kChunkRows, b.n - r), row0 = b.r0 + r;
    const PanelRows<T> A(p.x.data_ptr<T>() + row0 * s.d, s.d, n, s.d, L, L.kd, rows_f, rows_p);
    for (int64_t h = 0; h < L.halves; ++h) {
      for (int64_t p0 = b.c0; p0 < b.c0 + b.cn; p0 += L.pw1) {
        const int64_t w = std::min(L.pw1, s.f - p0);
        // Hidden column of activation column p0 in half h, and the step to the next one.
        const int64_t col0 = il ? 2 * p0 + h : h * s.f + p0, step = il ? 2 : 1;
        const T* bias = bias1 != nullptr ? bias1 + b.e * s.F1 + col0 : nullptr;
        T* out = p.hidden.data_ptr<T>() + row0 * s.F1 + col0;
        const T* panel = Pe + L.w1_panel(h, p0);
        if (kInPlace<T> && bias == nullptr && step == 1) {
          A.gemm(n, w, s.d, L.kd, panel, reinterpret_cast<float*>(out), s.F1, slice);
        } else {
          A.gemm(n, w, s.d, L.kd, panel, tile.data(), w, slice);
          store_tile<T>(tile.data(), n, w, bias, out, s.F1, step);
        }
      }
    }
    activate_hidden_block<T>(p.act, p.hidden, p.a, row0, n, b.c0, b.cn, il);
  }
  if (L.pairs) release_pairs_gemm();  // before this thread's next ATen GEMM may reconfigure the tiles
}

template <typename T>
void packed_gemm2_block(const PackedFfn& p, const Block& b) {
  const FfnDims& s = p.s;
  const PackedLayout& L = p.layout;
  thread_local std::vector<float> rows_f, slice, tile;
  thread_local std::vector<c10::BFloat16> rows_p;
  tile.resize(static_cast<size_t>(kChunkRows * L.pw2));
  const T* Pe = p.packed.data_ptr<T>() + b.e * L.per_expert();
  const T* bias2 = ptr_or_null<T>(p.b2);
  for (int64_t r = 0; r < b.n; r += kChunkRows) {
    const int64_t n = std::min(kChunkRows, b.n - r), row0 = b.r0 + r;
    const PanelRows<T> A(p.a.data_ptr<T>() + row0 * s.f, s.f, n, s.f, L, L.kf, rows_f, rows_p);
    for (int64_t p0 = b.c0; p0 < b.c0 + b.cn; p0 += L.pw2) {
      const int64_t w = std::min(L.pw2, s.d - p0);
      const T* bias = bias2 != nullptr ? bias2 + b.e * s.d + p0 : nullptr;
      T* out = p.y.data_ptr<T>() + row0 * s.d + p0;
      const T* panel = Pe + L.w2_panel(p0);
      if (kInPlace<T> && bias == nullptr) {
        A.gemm(n, w, s.f, L.kf, panel, reinterpret_cast<float*>(out), s.d, slice);
      } else {
        A.gemm(n, w, s.f, L.kf, panel, tile.data(), w, slice);
        store_tile<T>(tile.data(), n, w, bias, out, s.d, 1);
      }
    }
  }
  if (L.pairs) release_pairs_gemm();
}

#define SPARSEMOE_PACKED_BLOCKS(T)                                    \
  template void packed_gemm1_block<T>(const PackedFfn&, const Block&); \
  template void packed_gemm2_block<T>(const PackedFfn&, const Block&);
SPARSEMOE_PACKED_BLOCKS(float)
SPARSEMOE_PACKED_BLOCKS(c10::BFloat16)
SPARSEMOE_PACKED_BLOCKS(c10::Half)

}  // namespace sparsemoe
