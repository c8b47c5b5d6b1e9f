// The ranking rule of routing and of capacity priority, for host and device code alike:
// a (at index ia) ranks before b (at index ib) when it is larger; NaN ranks after every number
// (-inf included), so expert ids stay in range and distinct whatever the logits hold; ties go to
// the lower index. The order is total.
#pragma once

#if defined(__CUDACC__)
#define SPARSEMOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPARSEMOE_HOST_DEVICE inline
#endif

namespace sparsemoe {

template <typename T, typename I>
SPARSEMOE_HOST_DEVICE bool ranks_before(T a, I ia, T b, I ib) {
  const bool na = a != a, nb = b != b;  // NaN tests that need no math header on the device
  if (na != nb) return nb;
  if (!na && a != b) return a > b;
  return ia < ib;
}

}  // namespace sparsemoe
