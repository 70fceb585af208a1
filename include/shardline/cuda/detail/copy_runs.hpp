// shardline/cuda/detail/copy_runs.hpp: the copies that carry a write batch's pieces. A
// column-split parameter reaches each rank as one piece per row, equal lengths at a constant
// stride on both sides: one cudaMemcpy2DAsync moves such a run where a copy per row spends
// microseconds of launch on every few hundred bytes.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <shardline/cuda/detail/ipc_driver.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace shardline::cuda::detail {

/// `size` bytes from `source` to `destination`. Pieces merge only within one destination
/// block (the mapped allocation they land in) and one source block.
struct copy_piece {
  std::uintptr_t destination = 0;
  std::uintptr_t source = 0;
  std::size_t size = 0;
  std::uint32_t destination_block = 0;
  std::uint32_t source_block = 0;
};

/// Pieces [first, first + pieces) as `height` rows of `width` bytes, row i from
/// source + i * source_pitch to destination + i * destination_pitch. height 1 (a single piece,
/// or pieces that continue each other on both sides, width their sum): one 1-D copy.
struct planned_copy {
  std::uintptr_t destination = 0;
  std::uintptr_t source = 0;
  std::size_t width = 0;
  std::size_t height = 1;
  std::size_t destination_pitch = 0;
  std::size_t source_pitch = 0;
  std::size_t first = 0;
  std::size_t pieces = 1;

  bool is_2d() const noexcept { return height > 1; }
  /// One past the last source byte the copy reads.
  std::uintptr_t source_end() const noexcept { return source + source_pitch * (height - 1) + width; }
  std::uintptr_t destination_end() const noexcept { return destination + destination_pitch * (height - 1) + width; }
};

/// cudaMemcpy2D refuses pitches past cudaDeviceProp::memPitch, 2^31 - 1 on every GPU since
/// Kepler.
inline constexpr std::size_t max_copy_pitch = (std::size_t(1) << 31) - 1;

struct any_span {
  bool operator()(const planned_copy&) const noexcept { return true; }
};

/// The copies that move `pieces`, in their order: each maximal run of consecutive pieces
/// that continue each other on both sides becomes one 1-D copy; each run of two or more with
/// equal lengths and constant positive strides on both sides (each at least the length, at
/// most `max_pitch`) one 2-D copy; every other piece a 1-D copy of its own. Runs stay within
/// one destination block and one source block. A merged copy that `may_span` refuses (it
/// reads or writes the bytes between its first and last piece's) falls back to a copy per
/// piece. Every byte is written once, by the copy of its piece: rows never overlap.
template <class MaySpan = any_span>
std::vector<planned_copy> plan_copies(std::span<const copy_piece> pieces, MaySpan&& may_span = {},
                                      std::size_t max_pitch = max_copy_pitch) {
  std::vector<planned_copy> out;
  const auto single = [&](std::size_t i) {
    const auto& p = pieces[i];
    out.push_back({p.destination, p.source, p.size, 1, p.size, p.size, i, 1});
  };
  const auto same_blocks = [](const copy_piece& a, const copy_piece& b) {
    return a.destination_block == b.destination_block && a.source_block == b.source_block;
  };
  std::size_t i = 0;
  while (i < pieces.size()) {
    const auto& a = pieces[i];
    if (a.size == 0) {
      ++i;
      continue;
    }
    std::size_t j = i + 1;
    planned_copy c{a.destination, a.source, a.size, 1, a.size, a.size, i, 1};
    if (j < pieces.size() && same_blocks(a, pieces[j]) && pieces[j].size != 0) {
      const auto& b = pieces[j];
      if (b.destination == a.destination + a.size && b.source == a.source + a.size) {
        // Contiguous on both sides: one longer 1-D copy.
        std::size_t width = a.size;
        while (j < pieces.size() && same_blocks(a, pieces[j]) && pieces[j].size != 0 &&
               pieces[j].destination == a.destination + width && pieces[j].source == a.source + width)
          width += pieces[j++].size;
        c.width = c.destination_pitch = c.source_pitch = width;
      } else if (b.size == a.size && b.destination > a.destination && b.source > a.source) {
        const std::uintptr_t dpitch = b.destination - a.destination, spitch = b.source - a.source;
        if (dpitch >= a.size && spitch >= a.size && dpitch <= max_pitch && spitch <= max_pitch) {
          std::size_t height = 1;
          while (j < pieces.size() && same_blocks(a, pieces[j]) && pieces[j].size == a.size &&
                 pieces[j].destination == a.destination + height * dpitch &&
                 pieces[j].source == a.source + height * spitch) {
            ++height;
            ++j;
          }
          c.height = height;
          c.destination_pitch = dpitch;
          c.source_pitch = spitch;
        } else {
          j = i + 1;
        }
      } else {
        j = i + 1;
      }
    }
    c.pieces = j - i;
    if (c.pieces > 1 && !may_span(c)) {
      for (std::size_t k = i; k < j; ++k)
        if (pieces[k].size != 0) single(k);
    } else {
      out.push_back(c);
    }
    i = j;
  }
  return out;
}

/// Whether one copy may read [first, last]: both ends in one device allocation (the range
/// cuMemGetAddressRange gives: a VMM chunk's mapping, not the reserved range around it), or
/// both in pinned host memory (in one block where the driver tells pinned blocks' ranges).
/// Pageable or managed memory, a mix of kinds or devices, or a failed query: false.
inline bool one_source_allocation(std::uintptr_t first, std::uintptr_t last) noexcept {
  cudaPointerAttributes a{}, b{};
  if (cudaPointerGetAttributes(&a, reinterpret_cast<const void*>(first)) != cudaSuccess ||
      cudaPointerGetAttributes(&b, reinterpret_cast<const void*>(last)) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (a.type != b.type || a.device != b.device) return false;
  if (a.type != cudaMemoryTypeHost && a.type != cudaMemoryTypeDevice) return false;
  const auto& d = driver();
  if (!d.available) return a.type == cudaMemoryTypeHost;
  context_scope scope(a.device);
  if (scope.error() != cudaSuccess) return false;
  CUdeviceptr base = 0;
  std::size_t size = 0;
  if (d.get_address_range(&base, &size, static_cast<CUdeviceptr>(first)) != CUDA_SUCCESS)
    return a.type == cudaMemoryTypeHost;
  return last >= base && last - base < size;
}

/// Enqueues `c` on `stream` (cudaMemcpyDefault: the pointers say the direction).
inline cudaError_t enqueue_copy(const planned_copy& c, cudaStream_t stream) noexcept {
  if (c.is_2d())
    return cudaMemcpy2DAsync(reinterpret_cast<void*>(c.destination), c.destination_pitch,
                             reinterpret_cast<const void*>(c.source), c.source_pitch, c.width, c.height,
                             cudaMemcpyDefault, stream);
  return cudaMemcpyAsync(reinterpret_cast<void*>(c.destination), reinterpret_cast<const void*>(c.source), c.width,
                         cudaMemcpyDefault, stream);
}

}  // namespace shardline::cuda::detail
