// shardline/cuda/device.hpp: how many CUDA devices this process can use, and, when none, why.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>

namespace shardline::cuda {

namespace detail {

/// "13.0" for the runtime's and driver's 13000.
inline std::string version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

/// The words of unavailable_reason(), from what the probe saw: cudaGetDeviceCount's result
/// and count, cudaDriverGetVersion's version (0: no driver installed), the runtime's version
/// and CUDA_VISIBLE_DEVICES (null when unset). Empty when a device is usable.
inline std::string describe_unavailable(cudaError_t count_error, int count, int driver_version,
                                        int runtime_version, const char* visible_devices) {
  if (count_error == cudaSuccess && count > 0) return {};
  if (driver_version == 0) return "no CUDA driver";
  if (count_error == cudaErrorInsufficientDriver)
    return "CUDA driver too old: it supports CUDA " + version_string(driver_version) +
           ", this program's runtime is " + version_string(runtime_version);
  if (count_error == cudaSuccess || count_error == cudaErrorNoDevice) {
    std::string why = "no GPU";
    if (visible_devices) why += std::string(" (CUDA_VISIBLE_DEVICES='") + visible_devices + "')";
    return why;
  }
  return std::string("no usable GPU: cudaGetDeviceCount: ") + cudaGetErrorString(count_error);
}

struct probe_result {
  cudaError_t error = cudaSuccess;
  int count = 0;
};

inline probe_result probe() noexcept {
  probe_result r;
  r.error = cudaGetDeviceCount(&r.count);
  if (r.error != cudaSuccess) {
    r.count = 0;  // the runtime leaves it untouched on failure
    (void)cudaGetLastError();
  }
  return r;
}

}  // namespace detail

/// The number of CUDA devices this process can use: 0, not an exception, when there is no
/// GPU, no driver, or a driver too old for this runtime. Thread safe.
inline int device_count() noexcept { return detail::probe().count; }

/// Why device_count() is 0, in words fit for a skip message: "no CUDA driver", "no GPU",
/// "no GPU (CUDA_VISIBLE_DEVICES='')", "CUDA driver too old: it supports CUDA 12.4, this
/// program's runtime is 13.0", or the runtime's own text for anything else. Empty when a
/// device is usable.
inline std::string unavailable_reason() {
  const auto p = detail::probe();
  int driver = 0, runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = CUDART_VERSION;
  (void)cudaGetLastError();
  return detail::describe_unavailable(p.error, p.count, driver, runtime, std::getenv("CUDA_VISIBLE_DEVICES"));
}

}  // namespace shardline::cuda
