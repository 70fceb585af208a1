// shardline/cuda/event.hpp: an owned CUDA event that remembers its device.
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/stream.hpp>

#include <cuda_runtime_api.h>

#include <string>
#include <system_error>

namespace shardline::cuda {

/// A CUDA event created on one device: it marks a point in a stream of that device.
/// Move-only; the destructor never throws. A default-constructed or moved-from event is
/// empty (valid() is false).
class event {
public:
  event() noexcept = default;

  /// Creates an event on `device`. `flags`: cudaEventDisableTiming by default (cheapest;
  /// pass cudaEventDefault to time with elapsed_ms). Throws shardline::error, e.g.
  /// "cudaEventCreate on device 3: invalid device ordinal".
  explicit event(int device, unsigned flags = cudaEventDisableTiming) : device_(device) {
    detail::device_scope scope(device);
    cudaEvent_t ev = nullptr;
    cudaError_t e = scope.error();
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ev, flags);
    throw_if(e, "cudaEventCreate on device " + std::to_string(device));
    handle_.reset(ev);
  }

  event(event&&) noexcept = default;
  event& operator=(event&&) noexcept = default;

  bool valid() const noexcept { return handle_ != nullptr; }
  cudaEvent_t native_handle() const noexcept { return handle_.get(); }
  int device() const noexcept { return device_; }

  /// Captures the work enqueued on `s` so far (`s` must belong to this event's device).
  void record(cudaStream_t s) { throw_if(cudaEventRecord(native_handle(), s), "cudaEventRecord"); }
  void record(const stream& s) { record(s.native_handle()); }
  void record(cudaStream_t s, std::error_code& ec) noexcept { set_if(cudaEventRecord(native_handle(), s), ec); }

  /// Whether the captured work is done (true for an event never recorded).
  bool ready() const {
    const cudaError_t e = cudaEventQuery(native_handle());
    if (e == cudaErrorNotReady) return false;
    throw_if(e, "cudaEventQuery");
    return true;
  }

  /// Blocks the calling thread until the captured work is done. Never call it on an
  /// io_context thread: co_await async_wait(event, ...) instead.
  void synchronize() const { throw_if(cudaEventSynchronize(native_handle()), "cudaEventSynchronize"); }
  void synchronize(std::error_code& ec) const noexcept { set_if(cudaEventSynchronize(native_handle()), ec); }

  /// Milliseconds between `start` and `stop` (both recorded, both timing events).
  friend float elapsed_ms(const event& start, const event& stop) {
    float ms = 0;
    throw_if(cudaEventElapsedTime(&ms, start.native_handle(), stop.native_handle()), "cudaEventElapsedTime");
    return ms;
  }

private:
  detail::event_handle handle_;
  int device_ = -1;
};

}  // namespace shardline::cuda
