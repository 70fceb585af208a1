// shardline/cuda/error.hpp: CUDA runtime errors as std::error_code, and the one way the CUDA
// part turns a failed call into an exception that names the call.
#pragma once

#include <shardline/error.hpp>

#include <cuda_runtime_api.h>

#include <string>
#include <string_view>
#include <system_error>

namespace shardline::cuda {

namespace detail {
class error_category_impl final : public std::error_category {
public:
  const char* name() const noexcept override { return "cuda"; }
  std::string message(int value) const override {
    return cudaGetErrorString(static_cast<cudaError_t>(value));
  }
  std::error_condition default_error_condition(int value) const noexcept override {
    switch (static_cast<cudaError_t>(value)) {
      case cudaErrorMemoryAllocation: return std::errc::not_enough_memory;
      case cudaErrorInvalidValue: return std::errc::invalid_argument;
      case cudaErrorNotPermitted: return std::errc::operation_not_permitted;
      case cudaErrorNotSupported: return std::errc::not_supported;
      default: return {value, *this};
    }
  }
};
}  // namespace detail

/// The category of cudaError_t values: message() is cudaGetErrorString's text ("out of
/// memory", "invalid argument"). Out of memory, invalid value, not permitted and not supported
/// compare equal to their std::errc conditions.
inline const std::error_category& error_category() noexcept {
  static const detail::error_category_impl instance;
  return instance;
}

inline std::error_code make_error_code(cudaError_t e) noexcept {
  return {static_cast<int>(e), error_category()};
}

/// Throws shardline::error(make_error_code(e)) when `e` is not cudaSuccess, its what() being
/// `call` and the CUDA text: throw_if(e, "cudaMalloc of 4096 bytes on device 1") throws
/// "cudaMalloc of 4096 bytes on device 1: out of memory". The runtime's last-error state is
/// cleared first, so the same failure does not surface again from a later cudaGetLastError.
inline void throw_if(cudaError_t e, std::string_view call) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  throw shardline::error(make_error_code(e), std::string(call));
}

/// The std::error_code overload's counterpart: sets `ec` (cleared on success), clearing the
/// last-error state on failure as throw_if does. Returns whether `e` was a failure.
inline bool set_if(cudaError_t e, std::error_code& ec) noexcept {
  if (e == cudaSuccess) {
    ec.clear();
    return false;
  }
  (void)cudaGetLastError();
  ec = make_error_code(e);
  return true;
}

}  // namespace shardline::cuda
