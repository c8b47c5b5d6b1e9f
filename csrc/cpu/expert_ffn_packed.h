// The expert FFN's forward blocks on weights packed by pack_expert_weights
// (cpu/packed_weights.h). The forward (cpu/expert_ffn.cpp) deals out the same (expert, output
// columns) blocks as on unpacked weights, with their boundaries on panel boundaries, and hands
// each block here unless the few-rows kernel on the original weights reads fewer bytes.
#pragma once

#include <ATen/ATen.h>

#include "activation.h"
#include "cpu/expert_blocks.h"
#include "cpu/packed_weights.h"
#include "ffn_checks.h"

namespace sparsemoe {

// What the forward's blocks read and write: x [N, d], hidden [N, F1], a [M, f], y [N, d], the
// biases (undefined when absent), the packed panels, and the weights themselves (the native
// blocks of cpu/native_forward.h read them in place).
struct PackedFfn {
  at::Tensor x, packed, b1, b2, hidden, a, y, w1, w2;
  FfnDims s;
  PackedLayout layout;
  ActivationSpec act;
  bool gate_up_interleaved;
};

// hidden and a for the block's activation columns (block aligned to layout.pw1).
template <typename T>
void packed_gemm1_block(const PackedFfn& p, const Block& b);

// y for the block's output columns (block aligned to layout.pw2).
template <typename T>
void packed_gemm2_block(const PackedFfn& p, const Block& b);

}  // namespace sparsemoe
