// The CUDA driver calls of the IPC transport (the VMM API and cuMemGetAddressRange), reached
// through the runtime's cudaGetDriverEntryPointByVersion rather than by linking libcuda: a
// binary that includes the transport starts where no driver is installed (CI), and reports
// "no CUDA driver" only when it tries to export or import. Also: the driver's error codes as
// std::error_code, RAII for everything an import creates, and which path an allocation
// takes (legacy IPC handle or VMM shareable handle).
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/detail/ipc_wire.hpp>
#include <shardline/cuda/error.hpp>

#include <cuda.h>  // types only: every driver function is resolved at run time
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <system_error>
#include <utility>

namespace shardline::cuda::detail {

class driver_error_category_impl;

/// The entry points, resolved once per process. `available` is false where the runtime
/// found no driver (or one too old for the VMM API): every call then fails with `missing`.
struct driver_api {
  decltype(&::cuMemGetAddressRange_v2) get_address_range = nullptr;
  decltype(&::cuMemRetainAllocationHandle) retain_allocation_handle = nullptr;
  decltype(&::cuMemGetAllocationPropertiesFromHandle) allocation_properties = nullptr;
  decltype(&::cuMemExportToShareableHandle) export_to_shareable_handle = nullptr;
  decltype(&::cuMemImportFromShareableHandle) import_from_shareable_handle = nullptr;
  decltype(&::cuMemRelease) release = nullptr;
  decltype(&::cuMemAddressReserve) address_reserve = nullptr;
  decltype(&::cuMemAddressFree) address_free = nullptr;
  decltype(&::cuMemMap) map = nullptr;
  decltype(&::cuMemUnmap) unmap = nullptr;
  decltype(&::cuMemSetAccess) set_access = nullptr;
  decltype(&::cuMemCreate) create = nullptr;
  decltype(&::cuMemGetAllocationGranularity) allocation_granularity = nullptr;
  decltype(&::cuGetErrorString) error_string = nullptr;
  bool available = false;
  cudaError_t missing = cudaSuccess;  // why not available
};

namespace driver_detail {
template <class Fn>
bool resolve(const char* name, Fn& fn, cudaError_t& why) noexcept {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status{};
  // 12000: the ABI of each symbol as of CUDA 12.0 (cuMemGetAddressRange is its _v2 there).
  const cudaError_t e = cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &status);
  if (e != cudaSuccess || status != cudaDriverEntryPointSuccess || !p) {
    (void)cudaGetLastError();
    if (why == cudaSuccess) why = e != cudaSuccess ? e : cudaErrorSymbolNotFound;
    return false;
  }
  fn = reinterpret_cast<Fn>(p);
  return true;
}
}  // namespace driver_detail

inline const driver_api& driver() noexcept {
  static const driver_api api = [] {
    driver_api d;
    cudaError_t why = cudaSuccess;
    using driver_detail::resolve;
    d.available = resolve("cuMemGetAddressRange", d.get_address_range, why) &
                  resolve("cuMemRetainAllocationHandle", d.retain_allocation_handle, why) &
                  resolve("cuMemGetAllocationPropertiesFromHandle", d.allocation_properties, why) &
                  resolve("cuMemExportToShareableHandle", d.export_to_shareable_handle, why) &
                  resolve("cuMemImportFromShareableHandle", d.import_from_shareable_handle, why) &
                  resolve("cuMemRelease", d.release, why) & resolve("cuMemAddressReserve", d.address_reserve, why) &
                  resolve("cuMemAddressFree", d.address_free, why) & resolve("cuMemMap", d.map, why) &
                  resolve("cuMemUnmap", d.unmap, why) & resolve("cuMemSetAccess", d.set_access, why) &
                  resolve("cuMemCreate", d.create, why) &
                  resolve("cuMemGetAllocationGranularity", d.allocation_granularity, why) &
                  resolve("cuGetErrorString", d.error_string, why);
    d.missing = why;
    return d;
  }();
  return api;
}

class driver_error_category_impl final : public std::error_category {
public:
  const char* name() const noexcept override { return "cuda driver"; }
  std::string message(int value) const override {
    const char* s = nullptr;
    if (const auto& d = driver(); d.error_string) d.error_string(static_cast<CUresult>(value), &s);
    return s ? s : "CUDA driver error " + std::to_string(value);
  }
};

/// The category of CUresult values; message() is cuGetErrorString's text.
inline const std::error_category& driver_error_category() noexcept {
  static const driver_error_category_impl instance;
  return instance;
}

inline std::error_code make_driver_error(CUresult r) noexcept { return {static_cast<int>(r), driver_error_category()}; }

/// The driver unreachable: the runtime's reason, as a cuda::error_category() code.
inline std::error_code driver_missing() noexcept {
  const auto& d = driver();
  return make_error_code(d.missing == cudaSuccess ? cudaErrorNoDevice : d.missing);
}

/// Which way an allocation is exported, from what cuMemRetainAllocationHandle said (whether
/// the address is VMM memory, i.e. cuMemCreate + cuMemMap, as PyTorch's expandable segments
/// allocate) and, for VMM memory, the handle types it was created to allow.
enum class export_path { legacy, vmm };

inline export_path choose_export(bool is_vmm, unsigned long long requested_handle_types) noexcept {
  // VMM memory created without a POSIX descriptor handle type cannot be exported as one; the
  // legacy call is then the only one left (the driver refuses it, and the message says why).
  if (is_vmm && (requested_handle_types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) != 0) return export_path::vmm;
  return export_path::legacy;
}

/// Makes `device`'s primary context current for driver calls and restores the previous device.
class context_scope {
public:
  explicit context_scope(int device) noexcept : scope_(device) {
    if ((error_ = scope_.error()) == cudaSuccess) error_ = cudaFree(nullptr);  // creates the context if need be
    if (error_ != cudaSuccess) (void)cudaGetLastError();
  }
  cudaError_t error() const noexcept { return error_; }

private:
  device_scope scope_;
  cudaError_t error_ = cudaSuccess;
};

/// The UUID of device `ordinal` (this process's numbering).
inline cudaError_t uuid_of(int ordinal, device_uuid& out) noexcept {
  cudaDeviceProp p{};
  const cudaError_t e = cudaGetDeviceProperties(&p, ordinal);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return e;
  }
  static_assert(sizeof(p.uuid.bytes) == 16);
  for (std::size_t i = 0; i < 16; ++i) out[i] = static_cast<std::byte>(p.uuid.bytes[i]);
  return cudaSuccess;
}

/// This process's ordinal of the device with `uuid`, or -1 when it sees no such device.
inline int ordinal_of(const device_uuid& uuid) noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  for (int d = 0; d < count; ++d) {
    device_uuid u{};
    if (uuid_of(d, u) == cudaSuccess && u == uuid) return d;
  }
  return -1;
}

/// A receiver allocation as the sender sees it: mapped into its own address space, or, when
/// sender and receiver are one process, used in place. Move-only; releases what it made
/// (cudaIpcCloseMemHandle; or cuMemUnmap, cuMemAddressFree, cuMemRelease) and never throws.
class imported_allocation {
public:
  imported_allocation() = default;
  imported_allocation(imported_allocation&& o) noexcept { *this = std::move(o); }
  imported_allocation& operator=(imported_allocation&& o) noexcept {
    if (this != &o) {
      reset();
      kind_ = o.kind_;
      base_ = std::exchange(o.base_, 0);
      size_ = std::exchange(o.size_, 0);
      handle_ = std::exchange(o.handle_, 0);
      owned_ = std::exchange(o.owned_, false);
      mapped_ = std::exchange(o.mapped_, false);
      reserved_ = std::exchange(o.reserved_, false);
      device_ = o.device_;
    }
    return *this;
  }
  ~imported_allocation() { reset(); }

  /// The receiver's own pointer (sender and receiver in one process).
  static imported_allocation in_place(std::uint64_t base, std::uint64_t size) {
    imported_allocation a;
    a.base_ = base;
    a.size_ = size;
    return a;
  }

  /// Opens a legacy handle in `device`'s context (peer access enabled when the memory is on
  /// another device).
  static imported_allocation open_legacy(const ipc_allocation& x, int device, std::error_code& ec) {
    imported_allocation a;
    context_scope scope(device);
    if (scope.error() != cudaSuccess) {
      ec = make_error_code(scope.error());
      return a;
    }
    cudaIpcMemHandle_t h{};
    static_assert(sizeof(h) == ipc_legacy_handle_bytes);
    std::memcpy(&h, x.legacy.data(), sizeof h);
    void* p = nullptr;
    if (set_if(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), ec)) return a;
    a.kind_ = ipc_handle_kind::legacy;
    a.base_ = reinterpret_cast<std::uintptr_t>(p);
    a.size_ = x.size;
    a.owned_ = true;
    a.device_ = device;
    return a;
  }

  /// Imports a VMM allocation from `fd` (the descriptor stays the caller's), maps it and
  /// gives `device` read-write access.
  static imported_allocation import_vmm(const ipc_allocation& x, int fd, int device, std::error_code& ec) {
    imported_allocation a;
    const auto& d = driver();
    if (!d.available) {
      ec = driver_missing();
      return a;
    }
    context_scope scope(device);
    if (scope.error() != cudaSuccess) {
      ec = make_error_code(scope.error());
      return a;
    }
    a.kind_ = ipc_handle_kind::vmm;
    a.device_ = device;
    const auto check = [&](CUresult r) {
      if (r != CUDA_SUCCESS) ec = make_driver_error(r);
      return r == CUDA_SUCCESS;
    };
    CUmemGenericAllocationHandle h = 0;
    if (!check(d.import_from_shareable_handle(&h, reinterpret_cast<void*>(static_cast<std::uintptr_t>(fd)),
                                              CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)))
      return a;
    a.handle_ = h;
    a.owned_ = true;
    CUdeviceptr va = 0;
    if (!check(d.address_reserve(&va, x.size, 0, 0, 0))) return a;
    a.base_ = va;
    a.size_ = x.size;
    a.reserved_ = true;
    if (!check(d.map(va, x.size, 0, h, 0))) return a;
    a.mapped_ = true;
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if (!check(d.set_access(va, x.size, &access, 1))) return a;
    ec.clear();
    return a;
  }

  std::uint64_t base() const noexcept { return base_; }
  std::uint64_t size() const noexcept { return size_; }

  void reset() noexcept {
    if (owned_ && kind_ == ipc_handle_kind::legacy && base_) {
      device_scope scope(device_);
      (void)cudaIpcCloseMemHandle(reinterpret_cast<void*>(static_cast<std::uintptr_t>(base_)));
    } else if (owned_ && kind_ == ipc_handle_kind::vmm) {
      const auto& d = driver();
      device_scope scope(device_);
      if (mapped_) (void)d.unmap(base_, size_);
      if (reserved_) (void)d.address_free(base_, size_);
      if (handle_) (void)d.release(handle_);
    }
    owned_ = mapped_ = reserved_ = false;
    base_ = size_ = 0;
    handle_ = 0;
  }

private:
  ipc_handle_kind kind_ = ipc_handle_kind::legacy;
  std::uint64_t base_ = 0;
  std::uint64_t size_ = 0;
  CUmemGenericAllocationHandle handle_ = 0;
  bool owned_ = false, mapped_ = false, reserved_ = false;
  int device_ = 0;
};

}  // namespace shardline::cuda::detail
