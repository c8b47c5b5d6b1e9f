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

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kMinBytes = size_t(4) << 20;
  constexpr uintptr_t kPage = 4096;
  if (t.device().is_cpu() && t.nbytes() >= kMinBytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t start = (p + kPage - 1) & ~(kPage - 1);
    const uintptr_t end = (p + t.nbytes()) & ~(kPage - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace sparsemoe
