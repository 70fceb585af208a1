// shardline/cuda/device_buffer.hpp: memory of one CUDA device (cudaMalloc), owned.
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

/// `size()` bytes of device memory on `device()`, 256-byte aligned at least (cudaMalloc's
/// guarantee). Move-only; the destructor frees it (cudaFree, which waits for the device's
/// work in flight) and never throws. The bytes are device memory: the host must not touch
/// them. A default-constructed or moved-from buffer is empty.
class device_buffer {
public:
  device_buffer() noexcept = default;

  /// Allocates `bytes` (0 allowed: a valid, empty allocation) on `device`, leaving the calling
  /// thread's current device as it was. Throws shardline::error, e.g. "cudaMalloc of 4096
  /// bytes on device 1: out of memory" (code cudaErrorMemoryAllocation, equal to
  /// std::errc::not_enough_memory).
  device_buffer(std::size_t bytes, int device) : size_(bytes), device_(device) {
    detail::device_scope scope(device);
    void* p = nullptr;
    cudaError_t e = scope.error();
    if (e == cudaSuccess) e = cudaMalloc(&p, std::max<std::size_t>(bytes, 1));
    throw_if(e, "cudaMalloc of " + std::to_string(bytes) + " bytes on device " + std::to_string(device));
    memory_.reset(static_cast<std::byte*>(p));
  }

  device_buffer(device_buffer&& o) noexcept
      : memory_(std::move(o.memory_)), size_(std::exchange(o.size_, 0)), device_(o.device_) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
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
  memory_location location() const noexcept { return memory_location::cuda(device_); }

private:
  detail::device_memory memory_;
  std::size_t size_ = 0;
  int device_ = -1;
};

}  // namespace shardline::cuda
