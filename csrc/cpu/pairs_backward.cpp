// The expert FFN's backward blocks in bfloat16 on the native bf16 micro-kernel (AVX512-BF16 /
// AMX), where the forward's panels are in pairs (cpu/microkernel_backward.h). Each product's B
// operand is paired along its reduction per block: the block's slice of w2 and w1 for grad_a and
// grad_x (their reduction is d and the block's hidden columns, the other way round from the
// forward's panels), and the rows of a and x for the weight gradients, whose reduction runs over
// the expert's rows and whose A operands (grad_y and grad_h) are transposed. Pairing and
// transposing are 16-bit moves, O(weights + rows) per block against O(rows x weights) products;
// where that pays (pairs_backward_pays) they replace oneDNN's bf16 GEMMs, which re-pack their
// weight operand on every call. Products
// accumulate in float32 and each output is rounded once, as in the float32 micro-kernel path.
#include <algorithm>
#include <memory>

#include "cpu/activation_kernels.h"
#include "cpu/float_tiles.h"
#include "cpu/microkernel_backward.h"
#include "cpu/packed_weights.h"
#include "cpu/pair_operands.h"

namespace sparsemoe {
namespace {

using BF16 = c10::BFloat16;

// grad_a and grad_x pair their weight rows in blocks of kSlabCols columns (512-byte pieces of
// rows, which pair at close to a copy's speed: 64-column slabs made the pairing 11% of a
// mixtral-like backward) by as many rows as fit in kChunkBytes, so that the block stays in L2
// while the rows stream past it; the products of a slab's row chunks add into a float32
// accumulator. Chunks of whole 1792-column rows (72 rows each) re-read a far larger accumulator
// per chunk instead: grad_a 1.6x slower.
constexpr int64_t kChunkBytes = int64_t(256) << 10;
constexpr int64_t kSlabCols = 256;
// The weight gradients' reduction over the rows is one call per tile: blocks have fewer than
// kPairsMaxRows rows, which bounds K as kRowsPerCall bounds M, and float32 accumulation over them
// errs far below the one rounding to bfloat16.
static_assert(kPairsMaxRows <= 256, "pairs blocks reduce over all their rows in one call");

int64_t even(int64_t k) { return (k + 1) / 2 * 2; }

// Rows of N columns per chunk of product_on_paired_rows: even, at least 2.
int64_t chunk_rows(int64_t N) { return std::max<int64_t>(2, kChunkBytes / (2 * int64_t(sizeof(BF16)) * N) * 2); }

template <typename T>
using Scratch = std::unique_ptr<T[]>;  // uninitialised (every element is written before it is read)

template <typename T>
Scratch<T> scratch(int64_t n) {
  return Scratch<T>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// out [M, N] (row stride ldo) = A [M, kp] @ B, rounded once to bf16, where B's rows k < K are
// row(k) [N] and its rows [K, kp) zero (kp = K rounded up to even). B is paired a block at a
// time, kSlabCols columns by chunk_rows rows, into `chunk`; each block's products are added into
// the float32 `acc` [M, N].
template <typename RowOf>
void product_on_paired_rows(int64_t M, int64_t N, int64_t K, const BF16* A, int64_t lda, const RowOf& row,
                            BF16* out, int64_t ldo, BF16* chunk, float* acc) {
  for (int64_t s0 = 0; s0 < N; s0 += kSlabCols) {
    const int64_t ns = std::min(kSlabCols, N - s0), kc = chunk_rows(ns);
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t kk = std::min(kc, K - k0);
      pair_rows([&](int64_t k) { return row(k0 + k) + s0; }, kk, ns, chunk);
      for (int64_t n0 = 0; n0 < ns; n0 += kTileCols) {
        const int64_t w = std::min(kTileCols, ns - n0);
        for (int64_t m0 = 0; m0 < M; m0 += kRowsPerCall) {
          pairs_gemm(std::min(kRowsPerCall, M - m0), w, even(kk), A + m0 * lda + k0, lda, chunk + 2 * n0, ns,
                     acc + m0 * N + s0 + n0, N, /*accumulate=*/k0 > 0);
        }
      }
    }
  }
  store_tile<BF16>(acc, M, N, nullptr, out, ldo, 1);
}

// The same product with K the rows: one call per tile.
void product_over_rows_into(int64_t M, int64_t N, int64_t K, const BF16* A, int64_t lda, const BF16* B,
                            int64_t ldb, BF16* out, int64_t ldo, float* tile) {
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerCall) {
    const int64_t m = std::min(kRowsPerCall, M - m0);
    for (int64_t n0 = 0; n0 < N; n0 += kTileCols) {
      const int64_t w = std::min(kTileCols, N - n0);
      pairs_gemm(m, w, K, A + m0 * lda, lda, B + 2 * n0, ldb, tile, w, false);
      store_tile<BF16>(tile, m, w, nullptr, out + m0 * ldo + n0, ldo, 1);
    }
  }
}

// src [rows, cols] (row stride ld) transposed into dst [cols, kp], its columns [rows, kp) zero:
// the A operand of a product over the rows, paired with B's zero padding.
void transposed_rows(const BF16* src, int64_t ld, int64_t rows, int64_t cols, int64_t kp, BF16* dst) {
  transpose_bf16(src, ld, rows, cols, dst, kp);
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * kp + rows, dst + (c + 1) * kp, BF16(0.0f));
}

}  // namespace

void pairs_backward_block(const MicrokernelBackward& p, const Block& b, BF16* dx, bool first) {
  const FfnDims& s = p.s;
  const bool il = p.gate_up_interleaved;
  const int64_t H = is_gated(p.act) ? 2 : 1, n = b.n, cn = b.cn, d = s.d;
  // The reductions as the pairs kernel takes them, padded to even: d (grad_a), the rows (the
  // weight gradients), the block's H * cn hidden columns (grad_x).
  const int64_t dp = even(d), np = even(n), hp = even(H * cn);
  // Per-block scratch, freed with the block (a bf16 block is a whole expert).
  Scratch<float> tile = scratch<float>(kRowsPerCall * kTileCols);
  Scratch<float> acc = scratch<float>(n * std::max(cn, d));
  Scratch<BF16> chunk = scratch<BF16>(kChunkBytes / int64_t(sizeof(BF16)) + 2 * kSlabCols);
  Scratch<BF16> grad_a = scratch<BF16>(n * cn), a = scratch<BF16>(n * cn), grad_h = scratch<BF16>(n * hp);
  Scratch<BF16> at = scratch<BF16>(std::max(d, H * cn) * np), bp = scratch<BF16>(np * std::max(cn, d));
  Scratch<BF16> rows_p, halves;
  const BF16* gy = p.gy.data_ptr<BF16>() + b.r0 * d;
  const BF16* x = p.x.data_ptr<BF16>() + b.r0 * d;
  const BF16* w1 = p.w1.data_ptr<BF16>() + b.e * p.w1.stride(0);
  const BF16* w2 = p.w2.data_ptr<BF16>() + b.e * p.w2.stride(0);
  const int64_t ld1 = p.w1.stride(1), ld2 = p.w2.stride(1);

  // grad_a [n, cn] = grad_y [n, d] @ w2[e][:, c0 : c0 + cn], rounded to bf16 as an eager GEMM
  // would; grad_y's rows in place unless d is odd.
  const BF16* gya = gy;
  int64_t lda = d;
  if (dp != d) {
    rows_p = scratch<BF16>(n * dp);
    for (int64_t r = 0; r < n; ++r) {
      std::copy(gy + r * d, gy + (r + 1) * d, rows_p.get() + r * dp);
      rows_p[r * dp + d] = BF16(0.0f);
    }
    gya = rows_p.get();
    lda = dp;
  }
  product_on_paired_rows(n, cn, d, gya, lda, [&](int64_t k) { return w2 + k * ld2 + b.c0; }, grad_a.get(), cn,
                         chunk.get(), acc.get());

  // The activation's backward on the block's hidden columns: grad_h in [gate | up] halves (row
  // stride hp, the padding column zero), and a.
  const BF16* h = p.hidden.data_ptr<BF16>() + b.r0 * s.F1;
  ActIn<BF16> hin{h + b.c0, H == 2 ? h + s.f + b.c0 : nullptr, s.F1};
  if (il) {
    halves = scratch<BF16>(n * 2 * cn);
    split_gate_up<BF16>(h + 2 * b.c0, s.F1, halves.get(), 2 * cn, n, cn);
    hin = {halves.get(), halves.get() + cn, 2 * cn};
  }
  BF16* gh = grad_h.get();
  for (int64_t r = 0; r < n && hp != H * cn; ++r) gh[r * hp + H * cn] = BF16(0.0f);
  activation_backward_block<BF16>(p.act, grad_a.get(), cn, hin, {gh, H == 2 ? gh + cn : nullptr, hp},
                                  {a.get(), nullptr, cn}, n, cn);

  // grad_w2[e][:, c0 : c0 + cn] [d, cn] = grad_y^T [d, n] @ a [n, cn].
  transposed_rows(gy, d, n, d, np, at.get());
  pair_rows([&](int64_t k) { return a.get() + k * cn; }, n, cn, bp.get());
  product_over_rows_into(d, cn, np, at.get(), np, bp.get(), cn,
                         p.grad_w2.data_ptr<BF16>() + b.e * p.grad_w2.stride(0) + b.c0, p.grad_w2.stride(1),
                         tile.get());

  // Each half's rows of grad_w1 [cn, d] = grad_h_half^T [cn, n] @ x [n, d]; then the bias gradients.
  transposed_rows(gh, hp, n, H * cn, np, at.get());
  pair_rows([&](int64_t k) { return x + k * d; }, n, d, bp.get());
  for (int64_t half = 0; half < H; ++half) {
    // w1 / grad_w1 rows of activation column c: 2c + half (interleaved) or half * f + c.
    const int64_t row0 = il ? 2 * b.c0 + half : half * s.f + b.c0, step = il ? 2 : 1;
    product_over_rows_into(cn, d, np, at.get() + half * cn * np, np, bp.get(), d,
                           p.grad_w1.data_ptr<BF16>() + b.e * p.grad_w1.stride(0) + row0 * p.grad_w1.stride(1),
                           step * p.grad_w1.stride(1), tile.get());
  }
  block_bias_grads<BF16>(p, b, gh, hp, first);

  // dx [n, d] = grad_h [n, H * cn] @ the block's w1 rows in grad_h's column order: one reduction
  // over both halves per element, rounded once.
  const auto w1_row = [&](int64_t k) {
    const int64_t half = k / cn, c = b.c0 + k % cn;
    return w1 + (il ? 2 * c + half : half * s.f + c) * ld1;
  };
  product_on_paired_rows(n, d, H * cn, gh, hp, w1_row, dx, d, chunk.get(), acc.get());
  release_pairs_gemm();  // before this thread's next ATen GEMM may reconfigure the tiles
}

}  // namespace sparsemoe
