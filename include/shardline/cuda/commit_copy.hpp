// shardline/cuda/commit_copy.hpp: the commit copy of a weights_receiver's shadow into live
// tensors in GPU memory (receiver_options::commit_copy): what lets engine tensors in
// cuda_device memory sit behind a host shadow, the "pinned replica" of GPU memory over verbs
// (shardline/cuda/gpudirect.hpp), or behind any transport that writes host memory (shm).
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/dmabuf.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/stream.hpp>
#include <shardline/memory.hpp>
#include <shardline/weights_receiver.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace shardline::cuda {

namespace detail {

// The copier's state, shared by the copies of the std::function that holds it: a stream per
// device written to, and the shadow's pages locked once.
class device_commit_copy_state {
public:
  device_commit_copy_state() = default;
  device_commit_copy_state(const device_commit_copy_state&) = delete;
  device_commit_copy_state& operator=(const device_commit_copy_state&) = delete;
  ~device_commit_copy_state() {
    if (pinned_) (void)cudaHostUnregister(pinned_);
    (void)cudaGetLastError();
  }

  void copy(std::span<const shadow_copy> copies) {
    if (!pin_tried_) pin(copies);
    std::vector<int> used;
    for (const auto& c : copies) {
      if (c.to.empty()) continue;
      if (c.to_location.kind != memory_kind::cuda_device) {
        std::memcpy(c.to.data(), c.from.data(), c.to.size());
        continue;
      }
      const int device = c.to_location.device;
      cuda::stream& s = stream_for(device);
      throw_if(cudaMemcpyAsync(c.to.data(), c.from.data(), c.to.size(), cudaMemcpyHostToDevice, s.native_handle()),
               "commit copy: cudaMemcpyAsync of " + std::to_string(c.to.size()) + " shadow bytes to " +
                   hex(c.to.data()) + " (" + to_string(c.to_location) + ")");
      if (std::find(used.begin(), used.end(), device) == used.end()) used.push_back(device);
    }
    for (int device : used)
      throw_if(cudaStreamSynchronize(stream_for(device).native_handle()),
               "commit copy: cudaStreamSynchronize on device " + std::to_string(device));
  }

  bool pinned() const noexcept { return pinned_ != nullptr; }

private:
  cuda::stream& stream_for(int device) {
    if (device < 0) throw_if(cudaErrorInvalidDevice, "commit copy: cuda_device memory without a device ordinal");
    if (static_cast<std::size_t>(device) >= streams_.size()) streams_.resize(static_cast<std::size_t>(device) + 1);
    if (!streams_[static_cast<std::size_t>(device)].valid()) streams_[static_cast<std::size_t>(device)] = cuda::stream(device);
    return streams_[static_cast<std::size_t>(device)];
  }

  // The shadow is one arena: lock the span its copies read (cudaHostRegister), so copies to
  // the device run from page-locked memory. Where it cannot (no driver yet, memory already
  // registered by another part of the program), the copies run from pageable memory: the same
  // bytes, more slowly.
  void pin(std::span<const shadow_copy> copies) {
    pin_tried_ = true;
    const std::byte* lo = nullptr;
    const std::byte* hi = nullptr;
    bool to_device = false;
    for (const auto& c : copies) {
      if (c.from.empty()) continue;
      to_device |= c.to_location.kind == memory_kind::cuda_device;
      lo = lo ? std::min(lo, c.from.data()) : c.from.data();
      hi = hi ? std::max(hi, c.from.data() + c.from.size()) : c.from.data() + c.from.size();
    }
    if (!to_device || !lo) return;
    void* p = const_cast<std::byte*>(lo);
    if (cudaHostRegister(p, static_cast<std::size_t>(hi - lo), cudaHostRegisterPortable) == cudaSuccess)
      pinned_ = p;
    else
      (void)cudaGetLastError();
  }

  std::vector<cuda::stream> streams_;  // by device ordinal
  bool pin_tried_ = false;
  void* pinned_ = nullptr;
};

}  // namespace detail

/// A receiver_options::commit_copy that writes live memory of every kind: cuda_device tensors
/// by cudaMemcpyAsync (host -> device, on a stream of the tensor's device, all of one commit
/// enqueued before it waits for them), host and host_pinned ones by memcpy. The first commit
/// page-locks the shadow (cudaHostRegister over the span the copies read, released when the
/// last copy of this copier goes: keep the weights_receiver's endpoint, which owns the shadow,
/// alive longer than the weights_receiver, as declaring it first does).
///
/// The copy runs on the receiver's executor and blocks it until every byte is on the device
/// (as the host memcpy blocks it). A failed CUDA call throws shardline::error naming the call,
/// the bytes and the device: the version then fails to commit with that code and the
/// receiver's state() is dirty (live memory may hold part of it).
inline commit_copier device_commit_copy() {
  auto state = std::make_shared<detail::device_commit_copy_state>();
  return {memory_kinds{memory_kind::host, memory_kind::host_pinned, memory_kind::cuda_device},
          [state](std::span<const shadow_copy> copies) { state->copy(copies); }};
}

}  // namespace shardline::cuda
