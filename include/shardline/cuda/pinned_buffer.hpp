// shardline/cuda/pinned_buffer.hpp: page-locked host memory (cudaHostAlloc), owned.
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/memory.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string>
#include <utility>

namespace shardline::cuda {

/// `size()` bytes of page-locked host memory, page aligned, that copies to and from a GPU
/// use without a staging copy. Move-only; the destructor frees it (cudaFreeHost) and never
/// throws. `device()` is the device whose context allocated it. A default-constructed or
/// moved-from buffer is empty.
class pinned_buffer {
public:
  pinned_buffer() noexcept = default;

  /// Allocates `bytes` (0 allowed) with cudaHostAlloc through `device`'s context. `flags`:
  /// cudaHostAllocPortable (the default: pinned for every device), | cudaHostAllocMapped to
  /// let kernels read and write it in place, | cudaHostAllocWriteCombined for memory the host
  /// only writes. Throws shardline::error, e.g. "cudaHostAlloc of 4096 bytes on device 0: out
  /// of memory".
  pinned_buffer(std::size_t bytes, int device, unsigned flags = cudaHostAllocPortable)
      : size_(bytes), device_(device) {
    detail::device_scope scope(device);
    void* p = nullptr;
    cudaError_t e = scope.error();
    if (e == cudaSuccess) e = cudaHostAlloc(&p, std::max<std::size_t>(bytes, 1), flags);
    throw_if(e, "cudaHostAlloc of " + std::to_string(bytes) + " bytes on device " + std::to_string(device));
    memory_.reset(static_cast<std::byte*>(p));
  }

  pinned_buffer(pinned_buffer&& o) noexcept
      : memory_(std::move(o.memory_)), size_(std::exchange(o.size_, 0)), device_(o.device_) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    if (this != &o) {
      memory_ = std::move(o.memory_);
      size_ = std::exchange(o.size_, 0);
      device_ = o.device_;
    }
    return *this;
  }

  bool valid() const noexcept { return memory_ != nullptr; }
  std::byte* data() const noexcept { return memory_.get(); }
  std::size_t size() const noexcept { return size_; }
  std::span<std::byte> bytes() const noexcept { return {data(), size_}; }
  int device() const noexcept { return device_; }
  memory_location location() const noexcept { return memory_location::host_pinned(); }

private:
  detail::pinned_memory memory_;
  std::size_t size_ = 0;
  int device_ = -1;
};

}  // namespace shardline::cuda
