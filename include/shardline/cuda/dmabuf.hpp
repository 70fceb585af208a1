// shardline/cuda/dmabuf.hpp: device memory exported as a Linux dma-buf file descriptor
// (cuMemGetHandleForAddressRange), which an RDMA device can register (ibv_reg_dmabuf_mr: see
// shardline/cuda/gpudirect.hpp). The driver is reached through the runtime, as the IPC
// transport reaches it (cuda/detail/ipc_driver.hpp): binaries start where no driver is installed.
#pragma once

#include <shardline/cuda/detail/ipc_driver.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/error.hpp>

#include <cuda.h>  // types only
#include <cuda_runtime_api.h>

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <system_error>
#include <utility>

namespace shardline::cuda {

namespace detail {

// The driver calls of dma-buf export, resolved once per process.
struct dmabuf_driver_api {
  decltype(&::cuMemGetHandleForAddressRange) get_handle = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetAttribute) get_attribute = nullptr;
  bool available = false;
  cudaError_t missing = cudaSuccess;
};

inline const dmabuf_driver_api& dmabuf_driver() noexcept {
  static const dmabuf_driver_api api = [] {
    dmabuf_driver_api d;
    cudaError_t why = cudaSuccess;
    using driver_detail::resolve;
    d.available = resolve("cuMemGetHandleForAddressRange", d.get_handle, why) &
                  resolve("cuDeviceGet", d.device_get, why) & resolve("cuDeviceGetAttribute", d.get_attribute, why);
    d.missing = why;
    return d;
  }();
  return api;
}

inline std::string hex(const void* p) {
  char s[2 + 2 * sizeof(void*) + 1];
  std::snprintf(s, sizeof s, "%p", p);
  return s;
}

}  // namespace detail

/// CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED of CUDA device `device`: whether its memory can be
/// exported as a dma-buf. False, with `ec` set, when the driver cannot be asked (no driver:
/// a cuda::error_category() code; a driver error: its CUresult, "cuda driver" category).
inline bool dmabuf_supported(int device, std::error_code& ec) noexcept {
  const auto& d = detail::dmabuf_driver();
  ec.clear();
  if (!d.available) {
    ec = make_error_code(d.missing == cudaSuccess ? cudaErrorNoDevice : d.missing);
    return false;
  }
  detail::context_scope scope(device);  // initialises the driver, as the runtime's first call does
  if (scope.error() != cudaSuccess) {
    ec = make_error_code(scope.error());
    return false;
  }
  CUdevice dev{};
  int value = 0;
  CUresult r = d.device_get(&dev, device);
  if (r == CUDA_SUCCESS) r = d.get_attribute(&value, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED, dev);
  if (r != CUDA_SUCCESS) {
    ec = detail::make_driver_error(r);
    return false;
  }
  return value != 0;
}

class dmabuf_export;
inline dmabuf_export export_dmabuf(std::span<std::byte> bytes, int device, std::error_code& ec);

/// Device memory exported as a dma-buf: the descriptor (owned: closed on destruction), the
/// page-aligned range the driver exported, and where the bytes asked for start inside it.
/// Move-only; an empty one (default-constructed or moved-from) has fd() -1.
class dmabuf_export {
public:
  dmabuf_export() noexcept = default;
  dmabuf_export(dmabuf_export&& o) noexcept
      : fd_(std::exchange(o.fd_, -1)), bytes_(std::exchange(o.bytes_, {})), exported_(std::exchange(o.exported_, {})),
        device_(o.device_) {}
  dmabuf_export& operator=(dmabuf_export&& o) noexcept {
    if (this != &o) {
      close();
      fd_ = std::exchange(o.fd_, -1);
      bytes_ = std::exchange(o.bytes_, {});
      exported_ = std::exchange(o.exported_, {});
      device_ = o.device_;
    }
    return *this;
  }
  ~dmabuf_export() { close(); }

  bool valid() const noexcept { return fd_ >= 0; }
  int fd() const noexcept { return fd_; }
  /// The bytes asked for.
  std::span<std::byte> bytes() const noexcept { return bytes_; }
  /// What the dma-buf covers: bytes() widened to whole host pages.
  std::span<std::byte> exported() const noexcept { return exported_; }
  /// Where bytes() starts in the dma-buf (ibv_reg_dmabuf_mr's offset).
  std::uint64_t offset() const noexcept { return static_cast<std::uint64_t>(bytes_.data() - exported_.data()); }
  int device() const noexcept { return device_; }

  /// Closes the descriptor now (a registration made from it keeps its own reference).
  void close() noexcept {
    if (fd_ >= 0) (void)::close(std::exchange(fd_, -1));
  }

private:
  friend dmabuf_export export_dmabuf(std::span<std::byte>, int, std::error_code&);
  int fd_ = -1;
  std::span<std::byte> bytes_;
  std::span<std::byte> exported_;
  int device_ = -1;
};

/// Exports `bytes` (memory of CUDA device `device`, from cudaMalloc / cuMemAlloc, or VMM memory
/// mapped whole) as a dma-buf: cuMemGetHandleForAddressRange over the whole host pages that
/// hold them. On failure returns an empty export and sets `ec` (no driver: cuda::error_category();
/// the driver's CUresult otherwise, e.g. CUDA_ERROR_NOT_SUPPORTED where the platform lacks
/// dma-buf, CUDA_ERROR_INVALID_VALUE for memory that is not device memory).
inline dmabuf_export export_dmabuf(std::span<std::byte> bytes, int device, std::error_code& ec) {
  ec.clear();
  dmabuf_export x;
  const auto& d = detail::dmabuf_driver();
  if (!d.available) {
    ec = make_error_code(d.missing == cudaSuccess ? cudaErrorNoDevice : d.missing);
    return x;
  }
  detail::context_scope scope(device);
  if (scope.error() != cudaSuccess) {
    ec = make_error_code(scope.error());
    return x;
  }
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<std::uintptr_t>(bytes.data());
  const std::uintptr_t first = begin / page * page;
  const std::uintptr_t end = (begin + std::max<std::size_t>(bytes.size(), 1) + page - 1) / page * page;
  int fd = -1;
  const CUresult r = d.get_handle(&fd, static_cast<CUdeviceptr>(first), end - first,
                                  CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
  if (r != CUDA_SUCCESS) {
    ec = detail::make_driver_error(r);
    return x;
  }
  x.fd_ = fd;
  x.bytes_ = bytes;
  x.exported_ = {reinterpret_cast<std::byte*>(first), end - first};
  x.device_ = device;
  return x;
}

/// The same; throws shardline::error naming the range and the device, e.g.
/// "cuMemGetHandleForAddressRange of 4096 bytes at 0x7f2a00001000 on CUDA device 0 (dma-buf
/// export): operation not supported".
inline dmabuf_export export_dmabuf(std::span<std::byte> bytes, int device) {
  std::error_code ec;
  auto x = export_dmabuf(bytes, device, ec);
  if (ec)
    throw error(ec, "cuMemGetHandleForAddressRange of " + std::to_string(bytes.size()) + " bytes at " +
                        detail::hex(bytes.data()) + " on CUDA device " + std::to_string(device) + " (dma-buf export)");
  return x;
}

}  // namespace shardline::cuda
