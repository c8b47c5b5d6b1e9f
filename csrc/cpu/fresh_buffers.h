// Output buffers of the expert FFN. The weight gradients alone are as large as all expert
// weights, and buffers that large come fresh from the kernel on every call (malloc maps them),
// so first-touch page faults can cost more than the GEMMs that fill them. Asking for
// transparent huge pages on such buffers cuts the faults 512-fold; it is only a hint, and the
// memory stays an ordinary ATen allocation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsemoe {

inline at::Tensor with_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kMinBytes = size_t(4) << 20;
  constexpr uintptr_t kPage = 4096;
  // The whole allocation, also where the tensor's strides leave gaps (nbytes would undercount).
  const size_t bytes = t.storage().nbytes();
  if (t.device().is_cpu() && bytes >= kMinBytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.storage().data());
    const uintptr_t start = (p + kPage - 1) & ~(kPage - 1);
    const uintptr_t end = (p + bytes) & ~(kPage - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#endif
  return t;
}

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return with_huge_pages(at::empty(sizes, options));
}

// A buffer with the strides at::empty_like gives `like` (its own for a dense tensor, such as a
// transposed weight), so a gradient comes back in the layout of the tensor it belongs to.
inline at::Tensor empty_large_like(const at::Tensor& like) {
  return with_huge_pages(at::empty_like(like, at::MemoryFormat::Preserve));
}

}  // namespace sparsemoe
