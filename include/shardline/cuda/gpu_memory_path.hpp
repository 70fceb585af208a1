// shardline/cuda/gpu_memory_path.hpp: how GPU memory goes over RDMA verbs on this machine,
// decided from what a probe saw (shardline/cuda/gpudirect.hpp probes): directly through
// dma-buf (GPUDirect RDMA), or through a pinned host replica. The decision is a pure function
// of the probe, so every outcome and its message is testable without a GPU or an RDMA device.
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <system_error>

namespace shardline::cuda {

/// - dmabuf: the RDMA device registers GPU memory exported as a dma-buf
///   (cuMemGetHandleForAddressRange + ibv_reg_dmabuf_mr) and reads / writes it directly.
/// - pinned_replica: RDMA moves a page-locked host copy: a sender stages device -> pinned and
///   sends from there; a receiver's senders write a pinned shadow, copied host -> device into
///   the live tensors when a version commits.
enum class gpu_memory_path { dmabuf, pinned_replica };

inline std::string_view to_string(gpu_memory_path p) noexcept {
  return p == gpu_memory_path::dmabuf ? "dma-buf" : "pinned replica";
}

/// What the probe saw, one step after the other; a step that failed leaves the later ones
/// unrun (their fields as default-constructed), except that the RDMA device is opened whatever
/// the CUDA steps said.
struct gpu_memory_probe {
  int cuda_device = 0;
  /// Non-empty: CUDA device `cuda_device` cannot be used, and why ("no CUDA driver", "no GPU",
  /// "cudaMalloc of 2097152 bytes on device 0: out of memory").
  std::string cuda_error;
  /// CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED: 1, 0, or -1 when not read.
  int dmabuf_supported = -1;
  /// Non-empty: exporting a test allocation as a dma-buf failed, and why (the driver's words).
  std::string export_error;
  /// The RDMA device probed ("rxe0", "mlx5_0"); empty when there is none.
  std::string rdma_device;
  /// Non-empty: no RDMA device could be opened, and why (verbs::device's message, "no RDMA
  /// device: ...").
  std::string rdma_error;
  /// ibv_reg_dmabuf_mr of the exported test allocation on `rdma_device`: its errno, or
  /// success when `registered`.
  std::error_code register_error;
  bool registered = false;
};

/// The path and, in words, why: the reason starts with "dma-buf: " or "pinned replica: ".
struct gpu_memory_plan {
  gpu_memory_path path = gpu_memory_path::pinned_replica;
  int cuda_device = 0;
  std::string reason;
};

/// Whether `ec` says the RDMA device (or its driver, or the kernel) has no dma-buf
/// registration at all, rather than failing this one.
inline bool dmabuf_unsupported(std::error_code ec) noexcept {
  return ec == std::errc::operation_not_supported || ec == std::errc::not_supported ||
         ec == std::errc::protocol_not_supported || ec == std::errc::function_not_supported;
}

/// The path `probe` allows, and why. dma-buf only when every step passed; otherwise the pinned
/// replica, the reason naming the first step that failed, e.g.
/// "pinned replica: the RDMA device rxe0 cannot register dma-buf memory (Operation not supported)".
inline gpu_memory_plan decide_gpu_memory_path(const gpu_memory_probe& probe) {
  const std::string gpu = "CUDA device " + std::to_string(probe.cuda_device);
  const auto pinned = [&](std::string why) {
    return gpu_memory_plan{gpu_memory_path::pinned_replica, probe.cuda_device, "pinned replica: " + std::move(why)};
  };
  if (!probe.cuda_error.empty()) return pinned(gpu + " cannot be used (" + probe.cuda_error + ")");
  if (probe.dmabuf_supported == 0)
    return pinned(gpu + " cannot export its memory as dma-buf (CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0: "
                        "the driver or the kernel lacks it)");
  if (!probe.export_error.empty())
    return pinned(gpu + "'s memory could not be exported as dma-buf (" + probe.export_error + ")");
  const std::string can_export = "; " + gpu + " exports dma-buf, GPUDirect RDMA needs an RDMA device that registers it";
  if (!probe.rdma_error.empty()) return pinned(probe.rdma_error + can_export);
  if (probe.rdma_device.empty()) return pinned("no RDMA device was probed" + can_export);
  if (!probe.registered) {
    if (!probe.register_error)
      return pinned("ibv_reg_dmabuf_mr was not tried on the RDMA device " + probe.rdma_device);
    if (dmabuf_unsupported(probe.register_error))
      return pinned("the RDMA device " + probe.rdma_device + " cannot register dma-buf memory (" +
                    probe.register_error.message() + ")");
    return pinned("ibv_reg_dmabuf_mr of " + gpu + " memory on the RDMA device " + probe.rdma_device + " failed (" +
                  probe.register_error.message() + ")");
  }
  return {gpu_memory_path::dmabuf, probe.cuda_device,
          "dma-buf: " + gpu + " memory is registered on the RDMA device " + probe.rdma_device +
              " through dma-buf (cuMemGetHandleForAddressRange + ibv_reg_dmabuf_mr): RDMA reads and writes it "
              "directly (GPUDirect RDMA)"};
}

}  // namespace shardline::cuda
