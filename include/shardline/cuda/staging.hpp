// shardline/cuda/staging.hpp: the pipeline's staging in pinned host memory or in device
// memory, as staging policies (see shardline/staging.hpp).
#pragma once

#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/pinned_buffer.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/staging.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

namespace shardline::cuda {

namespace detail {

// A staging block: a buffer, over-allocated when asked for more alignment than the
// allocator guarantees, and the aligned bytes inside it.
template <class Buffer>
class staging_block {
public:
  staging_block() = default;
  staging_block(Buffer buffer, std::size_t offset, std::size_t size) noexcept
      : buffer_(std::move(buffer)), bytes_(buffer_.data() + offset, size) {}
  staging_block(staging_block&& o) noexcept
      : buffer_(std::move(o.buffer_)), bytes_(std::exchange(o.bytes_, {})) {}
  staging_block& operator=(staging_block&& o) noexcept {
    if (this != &o) {
      buffer_ = std::move(o.buffer_);
      bytes_ = std::exchange(o.bytes_, {});
    }
    return *this;
  }

  std::span<std::byte> bytes() const noexcept { return bytes_; }
  memory_location location() const noexcept { return buffer_.location(); }
  /// The device whose memory (or whose context's pinned memory) this is.
  int device() const noexcept { return buffer_.device(); }

private:
  Buffer buffer_;
  std::span<std::byte> bytes_;
};

inline void check_alignment(std::size_t alignment, const char* who) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0)
    throw error(make_error_code(errc::invalid_argument),
                std::string(who) + ": alignment " + std::to_string(alignment) + " is not a power of two");
}

// Allocates `bytes` aligned to `alignment` from `allocate(n)`, whose memory is aligned to
// `guaranteed` (a power of two) and in practice often more: an allocation that happens to be
// aligned is kept; only one that is not is made again, over-sized to be aligned inside.
template <class Buffer, class Allocate>
staging_block<Buffer> allocate_aligned(std::size_t bytes, std::size_t alignment, std::size_t guaranteed,
                                       Allocate allocate) {
  const auto offset_in = [alignment](const Buffer& b) {
    return static_cast<std::size_t>(-reinterpret_cast<std::uintptr_t>(b.data()) & (alignment - 1));
  };
  Buffer buffer = allocate(bytes);
  if (alignment > guaranteed && offset_in(buffer) != 0) {
    buffer = Buffer();
    buffer = allocate(bytes + alignment - guaranteed);
  }
  const std::size_t offset = offset_in(buffer);
  return {std::move(buffer), offset, bytes};
}

}  // namespace detail

/// Staging in page-locked host memory (cudaHostAlloc through `device`'s context, with
/// `flags`): loaders may fill it with cudaMemcpyAsync from GPU tensors at full speed, and
/// transports that read host memory (loopback, shm, verbs) send it as they send host memory.
/// Blocks are located host_pinned. allocate() throws shardline::error: invalid_argument for an
/// alignment that is not a power of two, the CUDA error naming cudaHostAlloc otherwise.
struct pinned_staging {
  int device = 0;
  unsigned flags = cudaHostAllocPortable;

  using block = detail::staging_block<pinned_buffer>;

  block allocate(std::size_t bytes, std::size_t alignment) const {
    detail::check_alignment(alignment, "pinned_staging");
    return detail::allocate_aligned<pinned_buffer>(bytes, alignment, 4096, [this](std::size_t n) {
      return pinned_buffer(n, device, flags);
    });
  }
};

/// Staging in memory of CUDA device `device` (cudaMalloc): loaders fill it with kernels or
/// device-to-device copies; only a transport whose source_kinds include cuda_device can send
/// it (the pipeline refuses the others with errc::unsupported_memory, naming the device).
/// Blocks are located cuda(device). allocate() throws as pinned_staging's does.
struct device_staging {
  int device = 0;

  using block = detail::staging_block<device_buffer>;

  block allocate(std::size_t bytes, std::size_t alignment) const {
    detail::check_alignment(alignment, "device_staging");
    return detail::allocate_aligned<device_buffer>(bytes, alignment, 256, [this](std::size_t n) {
      return device_buffer(n, device);
    });
  }
};

static_assert(staging_policy<pinned_staging>);
static_assert(staging_policy<device_staging>);

}  // namespace shardline::cuda
