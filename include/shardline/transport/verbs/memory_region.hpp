// shardline/transport/verbs/memory_region.hpp: a registered memory region that keeps its device alive.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/verbs/detail/handles.hpp>
#include <shardline/transport/verbs/device.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <system_error>

namespace shardline::verbs {

/// An ibv_mr over exactly `bytes`, with exactly `access` (0: local read only, enough
/// for the source of an RDMA WRITE).
class memory_region {
public:
  memory_region() = default;
  memory_region(std::shared_ptr<device> dev, std::span<std::byte> bytes, int access)
      : device_(std::move(dev)) {
    mr_.reset(ibv_reg_mr(device_->pd(), bytes.data(), bytes.size(), access));
    if (!mr_)
      throw error(std::error_code(errno, std::system_category()),
                  "verbs: ibv_reg_mr of " + std::to_string(bytes.size()) + " bytes on " +
                      device_->name() + " failed");
    bytes_ = bytes;
  }

  /// A region over `bytes` backed by a dma-buf (e.g. GPU memory exported by the CUDA driver,
  /// shardline/cuda/gpudirect.hpp): ibv_reg_dmabuf_mr(pd, offset, bytes.size(), iova =
  /// bytes.data(), fd, access), so remote addresses are the buffer's own. `offset` is where
  /// bytes.data() lies in the dma-buf. The fd is only read here: the MR holds its own
  /// reference to the buffer, the caller may close it. Throws shardline::error with the errno
  /// (EOPNOTSUPP where the device or its driver cannot register dma-buf memory, e.g. rxe),
  /// naming the range, the fd and the device.
  struct dmabuf {
    int fd = -1;
    std::uint64_t offset = 0;
  };
  memory_region(std::shared_ptr<device> dev, std::span<std::byte> bytes, dmabuf buffer, int access)
      : device_(std::move(dev)) {
    mr_.reset(ibv_reg_dmabuf_mr(device_->pd(), buffer.offset, bytes.size(),
                                reinterpret_cast<std::uintptr_t>(bytes.data()), buffer.fd, access));
    if (!mr_) {
      const int e = errno;
      char at[32];
      std::snprintf(at, sizeof at, "%p", static_cast<void*>(bytes.data()));
      throw error(std::error_code(e, std::system_category()),
                  "verbs: ibv_reg_dmabuf_mr of " + std::to_string(bytes.size()) + " bytes at " + at +
                      " (dma-buf fd " + std::to_string(buffer.fd) + ", offset " + std::to_string(buffer.offset) +
                      ") on " + device_->name() + " failed");
    }
    bytes_ = bytes;
  }

  std::span<std::byte> bytes() const noexcept { return bytes_; }
  std::uint32_t lkey() const noexcept { return mr_ ? mr_->lkey : 0; }
  std::uint32_t rkey() const noexcept { return mr_ ? mr_->rkey : 0; }
  ibv_mr* get() const noexcept { return mr_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(mr_); }
  local_region region() const noexcept { return {bytes_.data(), bytes_.size(), lkey()}; }

private:
  std::shared_ptr<device> device_;  // before mr_: destroyed after it
  detail::mr_handle mr_;
  std::span<std::byte> bytes_;
};

}  // namespace shardline::verbs
