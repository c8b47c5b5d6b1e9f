// The bfloat16 expert FFN's forward blocks on the weights as they are stored, with no packing:
// each product is computed transposed, out^T [cols, rows] = W [cols, K] @ rows^T [K, rows], so
// that the row-major weight ([out, in], as nn.Linear and every MoE checkpoint store it) is the
// native bf16 micro-kernel's A operand, read in place, and only the block's few rows are paired
// (VNNI) into the B operand. The tile is transposed back in L1 by the epilogue, which adds the
// bias and rounds into hidden / y as the packed blocks do.
//
// Packed panels (cpu/packed_weights.h) are faster once packed, but packing reads and writes
// every weight: in a training step, whose weights change every step, that costs as much memory
// traffic as two forwards on a few dozen rows per expert, and oneDNN's bf16 GEMMs re-pack the
// weights on every call. Blocks of kNativeMinRows..kNativeMaxRows rows run here when the forward
// has no panels; fewer rows keep the dot-product kernel, more the BLAS, whose cache-blocked GEMMs
// re-read a weight slice less often than this kernel's row chunks. float32 keeps the BLAS: the
// same scheme measured no faster than at::mm there, which needs no re-packing.
#pragma once

#include <ATen/ATen.h>

#include "cpu/expert_blocks.h"
#include "cpu/expert_ffn_packed.h"

namespace sparsemoe {

constexpr int64_t kNativeMinRows = 5, kNativeMaxRows = 64;

// Whether unpacked forward blocks of `dtype` run on the weights in place here: bfloat16 where its
// native micro-kernel multiplies pairs (AVX512-BF16 / AMX), unless turned off.
bool native_forward_runs(at::ScalarType dtype);

// Turns the native blocks off (or back on) for every later forward, for A/B measurements.
void set_native_forward(bool enabled);

// Native blocks run since the process started (all threads): shows which path a forward took.
int64_t native_forward_blocks();

// Whether this forward's blocks run natively: the dtype runs it, and the weights can be read in
// place: row-major (unit stride along the reduction), every reduction pairing whole 32-bit words
// (d, f, the strides and the offsets of w1, w2 and x even).
bool native_forward_fits(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2);
inline bool native_block(bool fits, int64_t n) { return fits && n >= kNativeMinRows && n <= kNativeMaxRows; }

// hidden and a for the block's activation columns; p.packed is unused, p.w1 is read in place.
void native_gemm1_block(const PackedFfn& p, const Block& b);

// y for the block's output columns, from p.w2 in place.
void native_gemm2_block(const PackedFfn& p, const Block& b);

}  // namespace sparsemoe
