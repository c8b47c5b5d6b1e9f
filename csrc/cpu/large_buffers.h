// Large CPU buffers of the kernels: dispatched rows, hidden activations, expert outputs, gradients
// of the inputs and of the expert weights, packed weights. Buffers that large come fresh from the
// kernel (malloc maps them and unmaps them when freed), zeroed page by page on first touch, on
// every call: that zeroing took 7-30% of an olmoe- / qwen3-like forward at T = 512-2048 and 10-20%
// of a training step, whose weight gradients alone are as large as all expert weights. So they
// come from a cache that keeps freed blocks mapped and hands them out again for the next buffer of
// the same rounded size, up to a limit on the bytes it holds (buffer_cache_limit). They are
// ordinary CPU tensors; torch.profiler sees their allocations and frees as it sees ATen's.
// Blocks of 4 MiB and more also ask for transparent huge pages (512-fold fewer faults).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparsemoe {

// A contiguous uninitialised tensor, from the cache when it is large.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// A buffer with the strides at::empty_like gives `like` (its own for a dense tensor, such as a
// transposed weight), so a gradient comes back in the layout of the tensor it belongs to.
at::Tensor empty_large_like(const at::Tensor& like);

// Buffers smaller than this come from ATen's allocator (glibc's heap serves them without faults).
constexpr int64_t kCachedMinBytes = int64_t(1) << 20;

// The freed bytes the cache holds, its limit (default 1 GiB, or SPARSEMOE_BUFFER_CACHE_MB),
// setting the limit (0: hold nothing; freed blocks beyond it are returned oldest first), and
// returning every held block to the system.
int64_t buffer_cache_bytes();
int64_t buffer_cache_limit();
void set_buffer_cache_limit(int64_t bytes);
void release_buffer_cache();

}  // namespace sparsemoe
