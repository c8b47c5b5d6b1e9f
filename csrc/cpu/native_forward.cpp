// Forward blocks on the weights in place (cpu/native_forward.h).
#include "cpu/native_forward.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/float_tiles.h"
#include "cpu/hidden_block.h"
#include "cpu/packed_weights.h"

namespace sparsemoe {
namespace {

using BF16 = c10::BFloat16;

// Weight rows per micro-kernel call: the A slice (64 rows of d) stays in L2 while the tile
// [64, rows] and the B operand stay in L1.
constexpr int64_t kNativeCols = 64;

std::atomic<bool> g_enabled{true};
std::atomic<int64_t> g_blocks{0};

// B [K, n] = rows^T as VNNI pairs for rows [n, K] (row stride ld): B[(k / 2) * 2n + 2r + k % 2]
// = rows[r, k], which is the 32-bit transpose of the rows' pairs of elements (K and ld even, so
// every pair is one aligned word).
void rows_as_pairs(const BF16* rows, int64_t ld, int64_t n, int64_t K, std::vector<BF16>& B) {
  B.resize(static_cast<size_t>(n * K));
  transpose_to_float<float>(reinterpret_cast<const float*>(rows), ld / 2, n, K / 2, reinterpret_cast<float*>(B.data()),
                            n);
}

// out[r, c * col_step] = tile[c, r] + bias[c * col_step], rounded, for n rows of w columns: the
// tile transposed in L1, then the packed blocks' epilogue.
void store_transposed(const float* tile, int64_t w, int64_t n, const BF16* bias, BF16* out, int64_t ldo,
                      int64_t col_step, std::vector<float>& scratch) {
  scratch.resize(static_cast<size_t>(n * w));
  transpose_to_float<float>(tile, n, w, n, scratch.data(), w);
  store_tile<BF16>(scratch.data(), n, w, bias, out, ldo, col_step);
}

const BF16* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<BF16>() : nullptr; }

bool even(int64_t v) { return v % 2 == 0; }
bool word_aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0; }

}  // namespace

bool native_forward_runs(at::ScalarType dtype) {
  return g_enabled.load(std::memory_order_relaxed) && dtype == at::kBFloat16 && panels_in_pairs(dtype);
}

void set_native_forward(bool enabled) { g_enabled.store(enabled); }

int64_t native_forward_blocks() { return g_blocks.load(); }

bool native_forward_fits(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  const auto in_place = [](const at::Tensor& w) {
    return w.dim() == 3 && w.stride(2) == 1 && even(w.size(2)) && even(w.stride(0)) && even(w.stride(1)) &&
           word_aligned(w);
  };
  return native_forward_runs(x.scalar_type()) && in_place(w1) && in_place(w2) && word_aligned(x);
}

namespace {

struct Scratch {
  std::vector<BF16> B;
  std::vector<float> tile, transposed;
};

// Counts the block and pairs its n rows (row stride K) into the thread's B operand.
Scratch& start_block(const BF16* rows, int64_t K, int64_t n) {
  g_blocks.fetch_add(1, std::memory_order_relaxed);
  thread_local Scratch sc;
  sc.tile.resize(static_cast<size_t>(kNativeCols * n));
  rows_as_pairs(rows, K, n, K, sc.B);
  return sc;
}

// out[r, c * step] for w <= kNativeCols columns: the weight rows W (row stride lda) times the
// paired rows, transposed and stored with the bias.
void column_slice(Scratch& sc, int64_t w, int64_t n, int64_t K, const BF16* W, int64_t lda, const BF16* bias,
                  BF16* out, int64_t ldo, int64_t step) {
  pairs_gemm(w, n, K, W, lda, sc.B.data(), n, sc.tile.data(), n, false);
  store_transposed(sc.tile.data(), w, n, bias, out, ldo, step, sc.transposed);
}

}  // namespace

void native_gemm1_block(const PackedFfn& p, const Block& b) {
  const FfnDims& s = p.s;
  const bool il = p.gate_up_interleaved;
  const int64_t halves = is_gated(p.act) ? 2 : 1;
  Scratch& sc = start_block(p.x.data_ptr<BF16>() + b.r0 * s.d, s.d, b.n);
  const BF16* w1 = p.w1.data_ptr<BF16>() + b.e * p.w1.stride(0);
  const int64_t ld1 = p.w1.stride(1);
  const BF16* bias1 = ptr_or_null(p.b1);
  for (int64_t h = 0; h < halves; ++h) {
    for (int64_t c0 = b.c0; c0 < b.c0 + b.cn; c0 += kNativeCols) {
      // Hidden column (and w1 row) of activation column c0 in half h, and the step to the next one.
      const int64_t col0 = il ? 2 * c0 + h : h * s.f + c0, step = il ? 2 : 1;
      column_slice(sc, std::min(kNativeCols, b.c0 + b.cn - c0), b.n, s.d, w1 + col0 * ld1, step * ld1,
                   bias1 != nullptr ? bias1 + b.e * s.F1 + col0 : nullptr,
                   p.hidden.data_ptr<BF16>() + b.r0 * s.F1 + col0, s.F1, step);
    }
  }
  release_pairs_gemm();  // before the thread's next ATen GEMM
  activate_hidden_block<BF16>(p.act, p.hidden, p.a, b.r0, b.n, b.c0, b.cn, il);
}

void native_gemm2_block(const PackedFfn& p, const Block& b) {
  const FfnDims& s = p.s;
  Scratch& sc = start_block(p.a.data_ptr<BF16>() + b.r0 * s.f, s.f, b.n);
  const BF16* w2 = p.w2.data_ptr<BF16>() + b.e * p.w2.stride(0);
  const int64_t ld2 = p.w2.stride(1);
  const BF16* bias2 = ptr_or_null(p.b2);
  for (int64_t c0 = b.c0; c0 < b.c0 + b.cn; c0 += kNativeCols) {
    column_slice(sc, std::min(kNativeCols, b.c0 + b.cn - c0), b.n, s.f, w2 + c0 * ld2, ld2,
                 bias2 != nullptr ? bias2 + b.e * s.d + c0 : nullptr, p.y.data_ptr<BF16>() + b.r0 * s.d + c0, s.d, 1);
  }
  release_pairs_gemm();
}

}  // namespace sparsemoe
