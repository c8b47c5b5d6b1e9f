// The cache of large CPU buffers (cpu/large_buffers.h): an allocator whose freed blocks wait,
// still mapped, in a list ordered by the time they were freed, for the next request of their
// exact rounded size.
#include "cpu/large_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <utility>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsemoe {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeMinBytes = size_t(4) << 20;

// Sizes are rounded so that buffers of nearly equal sizes (T or the row count changing a little)
// share blocks: to 2 MiB (whole huge pages) from 4 MiB up, to 64 KiB below.
size_t rounded(size_t n) {
  const size_t unit = n >= kHugeMinBytes ? kHugePage : size_t(64) << 10;
  return (n + unit - 1) / unit * unit;
}

int64_t default_limit() {
  const char* env = std::getenv("SPARSEMOE_BUFFER_CACHE_MB");
#if defined(SPARSEMOE_SANITIZED)
  // Reused blocks would hide a use after free from AddressSanitizer: hold none unless asked.
  if (env == nullptr || *env == '\0') return 0;
#else
  if (env == nullptr || *env == '\0') return int64_t(1) << 30;
#endif
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0 && mb <= (int64_t(1) << 40),
              "SPARSEMOE_BUFFER_CACHE_MB: expected a whole number of MiB >= 0, got '", env, "'");
  return static_cast<int64_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class LargeBufferCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = rounded(n);
    void* p = take(bytes);
    if (p == nullptr) p = map(bytes);
    note_use(p, static_cast<int64_t>(bytes));
    return {p, new Block{p, bytes}, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(held_);
  }
  int64_t limit() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_;
  }
  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "buffer cache limit: expected bytes >= 0, got ", bytes);
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
      trim(dropped);
    }
    for (const Block& b : dropped) std::free(b.ptr);
  }

  // Returns every held block to the system (the limit stays).
  void drop_all() {
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped.swap(free_);
      held_ = 0;
    }
    for (const Block& b : dropped) std::free(b.ptr);
  }

  static LargeBufferCache& get() {
    static LargeBufferCache* cache = new LargeBufferCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }

 private:
  LargeBufferCache() : limit_(default_limit()) {}

  static void free_block(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    get().give_back(*b);
    delete b;
  }

  // The most recently freed block of exactly `bytes`, or null.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      void* p = it->ptr;
      held_ -= bytes;
      free_.erase(std::next(it).base());
      return p;
    }
    return nullptr;
  }

  static void* map(size_t bytes) {
    void* p = nullptr;
    const size_t align = bytes >= kHugeMinBytes ? kHugePage : size_t(64);
    if (posix_memalign(&p, align, bytes) != 0 || p == nullptr) {
      // The cache's own blocks may be what stands in the way.
      get().drop_all();
      if (posix_memalign(&p, align, bytes) != 0 || p == nullptr) {
        TORCH_CHECK_WITH(OutOfMemoryError, false, "sparsemoe: could not allocate ", bytes, " bytes");
      }
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHugeMinBytes) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
    return p;
  }

  void give_back(const Block& b) {
    note_use(b.ptr, -static_cast<int64_t>(b.bytes));
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(b);
      held_ += b.bytes;
      trim(dropped);
    }
    for (const Block& d : dropped) std::free(d.ptr);
  }

  // Oldest blocks out until the held bytes are within the limit (caller holds mu_).
  void trim(std::list<Block>& dropped) {
    while (held_ > static_cast<size_t>(limit_) && !free_.empty()) {
      held_ -= free_.front().bytes;
      dropped.splice(dropped.end(), free_, free_.begin());
    }
  }

  // The profiler's memory events, as ATen's CPU allocator reports them.
  void note_use(void* p, int64_t delta) {
    int64_t in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ += delta;
      in_use = in_use_;
      reserved = in_use_ + static_cast<int64_t>(held_);
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, static_cast<size_t>(in_use), static_cast<size_t>(reserved),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mu_;
  std::list<Block> free_;  // oldest first
  size_t held_ = 0;
  int64_t in_use_ = 0;
  int64_t limit_;
};

c10::DispatchKeySet cpu_keys() { return c10::DispatchKeySet(c10::DispatchKey::CPU); }

bool cached(const at::TensorOptions& options, size_t bytes) {
  return options.device().is_cpu() && options.layout() == at::kStrided && !options.pinned_memory() &&
         bytes >= static_cast<size_t>(kCachedMinBytes);
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const size_t bytes = at::detail::computeStorageNbytesContiguous(sizes, c10::elementSize(dtype));
  if (!cached(options, bytes)) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &LargeBufferCache::get(), cpu_keys(), dtype, c10::nullopt);
}

at::Tensor empty_large_like(const at::Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (!like.is_non_overlapping_and_dense() || !cached(like.options(), bytes)) {
    return at::empty_like(like, at::MemoryFormat::Preserve);
  }
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), &LargeBufferCache::get(), cpu_keys(),
                                           like.scalar_type());
}

int64_t buffer_cache_bytes() { return LargeBufferCache::get().held(); }
int64_t buffer_cache_limit() { return LargeBufferCache::get().limit(); }
void set_buffer_cache_limit(int64_t bytes) { LargeBufferCache::get().set_limit(bytes); }
void release_buffer_cache() { LargeBufferCache::get().drop_all(); }

}  // namespace sparsemoe
