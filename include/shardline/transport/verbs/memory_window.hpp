// shardline/transport/verbs/memory_window.hpp: a type 2 memory window, bound to one QP over a
// memory region, whose rkey is the only one a remote writer gets.
#pragma once

#include <shardline/error.hpp>
#include <shardline/transport/verbs/detail/handles.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/memory_region.hpp>

#include <infiniband/verbs.h>

#include <cerrno>
#include <cstdint>
#include <memory>
#include <string>
#include <system_error>

namespace shardline::verbs {

/// A type 2 memory window (ibv_alloc_mw, IBV_MW_TYPE_2). Bound by an IBV_WR_BIND_MW work
/// request posted on one QP, it grants remote write to a memory region's bytes through that QP
/// only: its rkey arriving on any other QP is a remote access error. Destroying it
/// (ibv_dealloc_mw) invalidates it: its rkey is revoked. Keeps its device alive; the region it
/// is bound over, and the QP, must outlive the binding (destroy the window first).
/// The region needs IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_MW_BIND; it does not need (and, for
/// the window to mean anything, must not have) IBV_ACCESS_REMOTE_WRITE.
class memory_window {
public:
  memory_window() = default;
  /// Throws shardline::error with ibv_alloc_mw's errno, naming the device.
  explicit memory_window(std::shared_ptr<device> dev) : device_(std::move(dev)) {
    mw_.reset(ibv_alloc_mw(device_->pd(), IBV_MW_TYPE_2));
    if (!mw_)
      throw error(std::error_code(errno, std::system_category()),
                  "verbs: ibv_alloc_mw (type 2) on " + device_->name() + " failed (max_mw " +
                      std::to_string(device_->attr().max_mw) + ")");
    rkey_ = mw_->rkey;
  }

  /// The work request that binds this window over all of `mr` with remote write only; post
  /// it on the QP the window is for. Each call moves the rkey to a new value (ibv_inc_rkey):
  /// once that request completed successfully, rkey() is the window's key on that QP.
  ibv_send_wr bind(const memory_region& mr, std::uint64_t wr_id) noexcept {
    rkey_ = ibv_inc_rkey(rkey_);
    ibv_send_wr wr{};
    wr.wr_id = wr_id;
    wr.opcode = IBV_WR_BIND_MW;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.bind_mw.mw = mw_.get();
    wr.bind_mw.rkey = rkey_;
    wr.bind_mw.bind_info.mr = mr.get();
    wr.bind_mw.bind_info.addr = reinterpret_cast<std::uintptr_t>(mr.bytes().data());
    wr.bind_mw.bind_info.length = mr.bytes().size();
    wr.bind_mw.bind_info.mw_access_flags = IBV_ACCESS_REMOTE_WRITE;
    return wr;
  }

  std::uint32_t rkey() const noexcept { return rkey_; }
  explicit operator bool() const noexcept { return static_cast<bool>(mw_); }

private:
  std::shared_ptr<device> device_;  // before mw_: destroyed after it
  detail::mw_handle mw_;
  std::uint32_t rkey_ = 0;
};

}  // namespace shardline::verbs
