// shardline/cuda/gpudirect.hpp: GPU memory over RDMA verbs. Where the platform has it, device
// memory is exported as a dma-buf (cuMemGetHandleForAddressRange) and registered on the RDMA
// device (ibv_reg_dmabuf_mr): RDMA reads and writes it directly. Elsewhere a pinned host
// replica stands in: a sender stages device -> pinned and RDMA sends from there; a receiver's
// senders write a host shadow, copied host -> device into the engine's tensors before a version
// is announced. Which one is chosen at run time, by probing, with a sentence that says why.
//
// Needs both optional parts: shardline::cuda and shardline::verbs.
#pragma once

#include <shardline/cuda/commit_copy.hpp>
#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/dmabuf.hpp>
#include <shardline/cuda/gpu_memory_path.hpp>
#include <shardline/cuda/staging.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/verbs/detail/handles.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/memory_region.hpp>
#include <shardline/transport/verbs/options.hpp>
#include <shardline/weights_receiver.hpp>

#include <infiniband/verbs.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <utility>

namespace shardline::cuda {

/// GPU memory registered on an RDMA device through dma-buf: the export (its descriptor open
/// while this lives) and the memory region over exactly the bytes asked for, remote addresses
/// being their own device addresses. Move-only; the region is deregistered before the
/// descriptor closes.
class dmabuf_region {
public:
  dmabuf_region() = default;
  /// Exports `bytes` (memory of CUDA device `cuda_device`) and registers them on `dev` with
  /// `access` (0: local read, a sender's source; IBV_ACCESS_LOCAL_WRITE |
  /// IBV_ACCESS_REMOTE_WRITE: a receiver's destination). Throws shardline::error: the export's
  /// (see export_dmabuf), or the registration's, with ibv_reg_dmabuf_mr's errno (EOPNOTSUPP
  /// where the device cannot register dma-buf memory) naming the range and the device.
  dmabuf_region(std::shared_ptr<verbs::device> dev, std::span<std::byte> bytes, int cuda_device, int access)
      : export_(export_dmabuf(bytes, cuda_device)),
        region_(std::move(dev), bytes, verbs::memory_region::dmabuf{export_.fd(), export_.offset()}, access) {}

  const dmabuf_export& exported() const noexcept { return export_; }
  const verbs::memory_region& region() const noexcept { return region_; }
  /// The region alone; the descriptor closes (the region keeps its own reference to the buffer).
  verbs::memory_region release() && {
    export_.close();
    return std::move(region_);
  }

private:
  dmabuf_export export_;
  verbs::memory_region region_;  // after export_: destroyed first
};

/// What verbs::options::register_device_memory calls on the dma-buf path: a dmabuf_region of
/// the bytes, released into its memory region. Throws shardline::error
/// (errc::unsupported_memory) for memory that is not cuda_device, and what dmabuf_region throws.
inline verbs::memory_region register_dmabuf(const std::shared_ptr<verbs::device>& dev, std::span<std::byte> bytes,
                                            memory_location where, int access) {
  if (where.kind != memory_kind::cuda_device || where.device < 0)
    throw error(make_error_code(errc::unsupported_memory),
                "dma-buf registration: " + to_string(where) + " memory is not memory of a CUDA device");
  return dmabuf_region(dev, bytes, where.device, access).release();
}

// ---- the probe --------------------------------------------------------------------------------

/// The RDMA half of the probe: ibv_reg_dmabuf_mr of `length` bytes at `offset` of dma-buf `fd`
/// on `dev` (local and remote write, as a receiver registers), deregistered at once. Success,
/// or its errno (EOPNOTSUPP: the device, its provider or the kernel has no dma-buf registration).
inline std::error_code try_register_dmabuf(const verbs::device& dev, int fd, std::uint64_t offset, std::size_t length,
                                           std::uint64_t iova) noexcept {
  errno = 0;
  verbs::detail::mr_handle mr(
      ibv_reg_dmabuf_mr(dev.pd(), offset, length, iova, fd, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE));
  if (mr) return {};
  return {errno ? errno : EINVAL, std::system_category()};
}

/// Probes CUDA device `cuda_device` and, when given, the RDMA device `dev`: whether the GPU is
/// usable, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED, the export of a 2 MiB cudaMalloc as a dma-buf,
/// and the registration of that dma-buf on `dev`. `rdma_error`: why there is no `dev`. Never
/// throws shardline::error: each failure is a field of the result.
inline gpu_memory_probe probe_gpu_memory(const verbs::device* dev, std::string rdma_error, int cuda_device) {
  gpu_memory_probe p;
  p.cuda_device = cuda_device;
  p.rdma_error = std::move(rdma_error);
  if (dev) p.rdma_device = dev->name();
  device_buffer test;
  dmabuf_export exported;
  if (const int count = device_count(); count == 0) {
    p.cuda_error = unavailable_reason();
  } else if (cuda_device < 0 || cuda_device >= count) {
    p.cuda_error = "this process sees " + std::to_string(count) + " CUDA device" + (count == 1 ? "" : "s");
  } else {
    std::error_code ec;
    const bool supported = dmabuf_supported(cuda_device, ec);
    if (ec) {
      p.export_error = "CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED could not be read: " + ec.message();
    } else if ((p.dmabuf_supported = supported ? 1 : 0) == 1) {
      try {
        test = device_buffer(std::size_t{2} << 20, cuda_device);
      } catch (const error& failure) {
        p.cuda_error = failure.what();
      }
      if (test.valid()) {
        exported = export_dmabuf(test.bytes(), cuda_device, ec);
        if (ec) p.export_error = "cuMemGetHandleForAddressRange: " + ec.message();
      }
    }
  }
  if (dev && exported.valid()) {
    p.register_error = try_register_dmabuf(*dev, exported.fd(), exported.offset(), test.size(),
                                           reinterpret_cast<std::uintptr_t>(test.data()));
    p.registered = !p.register_error;
  }
  return p;
}

/// The path GPU memory of `cuda_device` takes over RDMA device `dev`, and why (see
/// decide_gpu_memory_path). Probes with real allocations: call once at start-up.
inline gpu_memory_plan choose_gpu_memory_path(const verbs::device& dev, int cuda_device) {
  return decide_gpu_memory_path(probe_gpu_memory(&dev, {}, cuda_device));
}

/// The same for the RDMA device `rdma` names (opened for the probe, then closed); where none
/// opens, the pinned replica, the reason saying why ("pinned replica: no RDMA device: ...").
/// Call it before constructing the transport, then use_gpu_memory(plan, rdma).
inline gpu_memory_plan choose_gpu_memory_path(const verbs::options& rdma, int cuda_device) {
  std::shared_ptr<verbs::device> dev;
  std::string why;
  try {
    dev = std::make_shared<verbs::device>(rdma.device, rdma.port, rdma.gid_index);
  } catch (const error& failure) {
    why = failure.what();
  }
  return decide_gpu_memory_path(probe_gpu_memory(dev.get(), std::move(why), cuda_device));
}

// ---- what each path needs ---------------------------------------------------------------------

/// The verbs transport's part of `plan`: on the dma-buf path, registers cuda_device memory
/// through dma-buf (options::register_device_memory = register_dmabuf), so a sender's
/// register_memory() and a receiver's expose() take it; on the pinned replica path, none
/// (cuda_device memory is refused: a sender stages in pinned memory, a receiver exposes a shadow).
inline void use_gpu_memory(const gpu_memory_plan& plan, verbs::options& rdma) {
  if (plan.path == gpu_memory_path::dmabuf)
    rdma.register_device_memory = &register_dmabuf;
  else
    rdma.register_device_memory = nullptr;
}

/// A weights_receiver's part of `plan`: the commit copy that writes cuda_device tensors
/// (device_commit_copy()) and, on the pinned replica path, the shadow (senders write host
/// memory the transport allocated, copied into the engine's device tensors at commit). On the
/// dma-buf path the shadow stays as `options` had it: without one, senders write the device
/// tensors in place.
inline void use_gpu_memory(const gpu_memory_plan& plan, receiver_options& options) {
  options.commit_copy = device_commit_copy();
  if (plan.path == gpu_memory_path::pinned_replica) options.shadow = true;
}

/// A sender's staging for `plan`, as a pipeline staging policy: device memory of the plan's
/// GPU on the dma-buf path (the loader fills it with kernels or device-to-device copies, RDMA
/// reads it), page-locked host memory on the pinned replica path (the loader copies device ->
/// pinned). shard_load::location tells the loader which. allocate() throws as pinned_staging's
/// and device_staging's do.
struct gpu_staging {
  gpu_memory_path path = gpu_memory_path::pinned_replica;
  int device = 0;

  class block {
  public:
    block() = default;
    explicit block(pinned_staging::block b) noexcept : pinned_(std::move(b)) {}
    explicit block(device_staging::block b) noexcept : device_(std::move(b)), on_device_(true) {}
    std::span<std::byte> bytes() const noexcept { return on_device_ ? device_.bytes() : pinned_.bytes(); }
    memory_location location() const noexcept {
      return on_device_ ? device_.location() : pinned_.bytes().data() ? pinned_.location() : memory_location::host_pinned();
    }

  private:
    pinned_staging::block pinned_;
    device_staging::block device_;
    bool on_device_ = false;
  };

  block allocate(std::size_t bytes, std::size_t alignment) const {
    if (path == gpu_memory_path::dmabuf) return block(device_staging{device}.allocate(bytes, alignment));
    return block(pinned_staging{device}.allocate(bytes, alignment));
  }
};

static_assert(staging_policy<gpu_staging>);

/// The staging policy `plan` calls for.
inline gpu_staging staging_for(const gpu_memory_plan& plan) noexcept { return {plan.path, plan.cuda_device}; }

}  // namespace shardline::cuda
