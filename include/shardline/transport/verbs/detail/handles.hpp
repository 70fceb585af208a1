// shardline/transport/verbs/detail/handles.hpp: owning handles for raw verbs objects.
#pragma once

#include <infiniband/verbs.h>
#include <sys/mman.h>

#include <cstddef>
#include <memory>
#include <utility>

namespace shardline::verbs::detail {

/// Stateless deleter: the handle stays one pointer wide. Destroy functions' status is
/// ignored on purpose: a destructor has nobody to report it to.
template <auto Fn>
struct deleter {
  void operator()(auto* p) const noexcept {
    if (p) (void)Fn(p);
  }
};

using device_list_handle = std::unique_ptr<ibv_device*, deleter<&ibv_free_device_list>>;
using context_handle = std::unique_ptr<ibv_context, deleter<&ibv_close_device>>;
using pd_handle = std::unique_ptr<ibv_pd, deleter<&ibv_dealloc_pd>>;
using mr_handle = std::unique_ptr<ibv_mr, deleter<&ibv_dereg_mr>>;
// ibv_dealloc_mw invalidates the window first: its rkey is dead once this handle is gone.
// (verbs.h defines it static inline: wrapped, so that the handle type has external linkage.)
inline int dealloc_mw(ibv_mw* mw) noexcept { return ibv_dealloc_mw(mw); }
using mw_handle = std::unique_ptr<ibv_mw, deleter<&dealloc_mw>>;
using comp_channel_handle = std::unique_ptr<ibv_comp_channel, deleter<&ibv_destroy_comp_channel>>;
using cq_handle = std::unique_ptr<ibv_cq, deleter<&ibv_destroy_cq>>;
using qp_handle = std::unique_ptr<ibv_qp, deleter<&ibv_destroy_qp>>;

/// An anonymous private mapping (the receiver's arenas), unmapped on destruction.
class mapping {
public:
  mapping() = default;
  explicit mapping(std::size_t bytes) : size_(bytes) {
    void* p = ::mmap(nullptr, bytes ? bytes : 1, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
  }
  mapping(mapping&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapping& operator=(mapping&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~mapping() {
    if (data_) ::munmap(data_, size_ ? size_ : 1);
  }
  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool valid() const noexcept { return data_ != nullptr; }

private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace shardline::verbs::detail
