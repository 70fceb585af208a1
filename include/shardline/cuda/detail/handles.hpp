// The raw CUDA handles the RAII classes own, each freed by a stateless deleter, and the
// scope that makes a device current for the calls that act on "the current device".
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <type_traits>

namespace shardline::cuda::detail {

template <auto Free>
struct deleter {
  template <class T>
  void operator()(T* p) const noexcept {
    (void)Free(p);  // a destructor reports nothing: the handle is gone either way
  }
};

inline cudaError_t free_device(std::byte* p) noexcept { return cudaFree(p); }
inline cudaError_t free_pinned(std::byte* p) noexcept { return cudaFreeHost(p); }

using stream_handle = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, deleter<&cudaStreamDestroy>>;
using event_handle = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, deleter<&cudaEventDestroy>>;
using device_memory = std::unique_ptr<std::byte, deleter<&free_device>>;
using pinned_memory = std::unique_ptr<std::byte, deleter<&free_pinned>>;

/// Makes `device` the calling thread's current device for the scope's lifetime and restores
/// the previous one after. Construction never throws: error() says whether it worked.
class device_scope {
public:
  explicit device_scope(int device) noexcept {
    if ((error_ = cudaGetDevice(&previous_)) != cudaSuccess) return;
    if (previous_ != device) {
      error_ = cudaSetDevice(device);
      changed_ = error_ == cudaSuccess;
    }
  }
  device_scope(const device_scope&) = delete;
  device_scope& operator=(const device_scope&) = delete;
  ~device_scope() {
    if (changed_) (void)cudaSetDevice(previous_);
  }

  cudaError_t error() const noexcept { return error_; }

private:
  int previous_ = 0;
  bool changed_ = false;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace shardline::cuda::detail
