// What the CPU's elementwise and dot-product loops share so that GCC vectorises them: the ISA
// clones the loops are compiled as, and element loads and stores written as plain bit moves.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// The loops are compiled for AVX-512 and AVX2 besides the baseline and picked at load time, so
// one wheel runs everywhere and still uses the wide units of the CPUs that have them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEMOE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPARSEMOE_ISA_CLONES
#endif
#define SPARSEMOE_INLINE inline __attribute__((always_inline))

namespace sparsemoe {

template <typename To, typename From>
SPARSEMOE_INLINE To bits_as(From v) {
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// Storage type <-> math type. bfloat16 is converted by hand (same round-to-nearest-even and NaN
// as c10::BFloat16) because the plain shifts vectorise and c10's branchy version does not.
template <typename T>
struct Elem {
  using acc = float;
  static SPARSEMOE_INLINE float load(const T* p) { return static_cast<float>(*p); }
  static SPARSEMOE_INLINE void store(T* p, float v) { *p = static_cast<T>(v); }
};
template <>
struct Elem<double> {
  using acc = double;
  static SPARSEMOE_INLINE double load(const double* p) { return *p; }
  static SPARSEMOE_INLINE void store(double* p, double v) { *p = v; }
};
template <>
struct Elem<c10::BFloat16> {
  using acc = float;
  static SPARSEMOE_INLINE float load(const c10::BFloat16* p) { return bits_as<float>(uint32_t(p->x) << 16); }
  static SPARSEMOE_INLINE void store(c10::BFloat16* p, float v) {
    const uint32_t u = bits_as<uint32_t>(v);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    p->x = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
  }
};

}  // namespace sparsemoe
