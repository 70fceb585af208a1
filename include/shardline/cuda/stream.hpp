// shardline/cuda/stream.hpp: an owned CUDA stream that remembers its device.
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/error.hpp>

#include <cuda_runtime_api.h>

#include <string>
#include <system_error>

namespace shardline::cuda {

/// A CUDA stream created on one device. Move-only; the destructor never throws (work still
/// queued on the stream runs to its end: cudaStreamDestroy does not wait for it). A
/// default-constructed or moved-from stream is empty (valid() is false).
/// Thread safety: as the CUDA runtime's, any thread may enqueue work on the stream.
class stream {
public:
  stream() noexcept = default;

  /// Creates a stream on `device` (the calling thread's current device is left as it was).
  /// `flags`: cudaStreamNonBlocking (the default: no implicit synchronisation with the legacy
  /// default stream) or cudaStreamDefault; `priority`: as cudaStreamCreateWithPriority.
  /// Throws shardline::error, e.g. "cudaStreamCreate on device 3: invalid device ordinal".
  explicit stream(int device, unsigned flags = cudaStreamNonBlocking, int priority = 0) : device_(device) {
    detail::device_scope scope(device);
    cudaStream_t s = nullptr;
    cudaError_t e = scope.error();
    if (e == cudaSuccess) e = cudaStreamCreateWithPriority(&s, flags, priority);
    throw_if(e, "cudaStreamCreate on device " + std::to_string(device));
    handle_.reset(s);
  }

  stream(stream&&) noexcept = default;
  stream& operator=(stream&&) noexcept = default;

  bool valid() const noexcept { return handle_ != nullptr; }
  cudaStream_t native_handle() const noexcept { return handle_.get(); }
  /// The device the stream was created on.
  int device() const noexcept { return device_; }

  /// Blocks the calling thread until every piece of work enqueued so far is done. Never call
  /// it on an io_context thread: co_await async_wait(stream, ...) instead.
  void synchronize() const { throw_if(cudaStreamSynchronize(native_handle()), "cudaStreamSynchronize"); }
  void synchronize(std::error_code& ec) const noexcept { set_if(cudaStreamSynchronize(native_handle()), ec); }

  /// Whether every piece of work enqueued so far is done (cudaStreamQuery), without blocking.
  bool ready() const {
    const cudaError_t e = cudaStreamQuery(native_handle());
    if (e == cudaErrorNotReady) return false;
    throw_if(e, "cudaStreamQuery");
    return true;
  }

private:
  detail::stream_handle handle_;
  int device_ = -1;
};

}  // namespace shardline::cuda
