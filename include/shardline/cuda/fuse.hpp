// shardline/cuda/fuse.hpp: the descriptor of one fuse copy (a tensor-parallel slice of a
// trainer's tensor placed into a fused inference parameter, q/k/v -> qkv_proj, gate/up ->
// gate_up_proj, optionally quantized bf16 -> fp8 e4m3 on the way), its validation, and the
// CPU reference the GPU kernels (shardline/cuda/fuse.cuh) are checked against. Plain C++: no
// CUDA needed; the host reference also serves loaders that fill host (pinned) staging.
#pragma once

#include <shardline/cuda/fp8.hpp>
#include <shardline/error.hpp>
#include <shardline/plan/parameter.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace shardline::cuda {

/// A row-major 2-D tensor a fuse copy reads (a higher-rank tensor as [dim 0, product of the
/// rest]). `row_stride`: elements from one row to the next, 0 for dense (`cols`). `name` is
/// for messages only; it must outlive the call it is passed to.
struct source_matrix {
  std::string_view name;
  const void* data = nullptr;
  dtype type = dtype::bf16;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t row_stride = 0;
};

/// A row-major 2-D tensor a fuse copy writes, as source_matrix. An f8_e4m3 destination also
/// has its scales: one f32 per `block`, dense, row-major, fp8_scale_shape({rows, cols}) (the
/// parameter fp8_scale_parameter describes); each holds the block's dequantization multiplier
/// (fp8_scale::inverse).
struct destination_matrix {
  std::string_view name;
  void* data = nullptr;
  dtype type = dtype::bf16;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t row_stride = 0;
  float* scales = nullptr;  ///< f8_e4m3 only
  fp8_block block{};        ///< f8_e4m3 only
};

/// One copy: the slice [source_row, source_row + rows) x [source_col, source_col + cols) of
/// `source` lands at (destination_row, destination_col) of `destination`. Tensor-parallel
/// rank r of tp takes rows [r * a / tp, (r + 1) * a / tp) of each member of a row-split fused
/// parameter (q/k/v, gate/up: stack_row_slices builds those), columns likewise for a column
/// split (o_proj, down_proj).
///
/// Same dtype on both sides: a byte copy. bf16 into f8_e4m3: quantized per block of the
/// destination (fp8.hpp's rounding and scale convention), which needs each block to lie in one
/// copy: a copy starts on a block boundary and ends on one or at the destination's edge.
/// Copies of one batch must not overlap in their destinations (not checked).
struct fuse_copy {
  source_matrix source;
  std::int64_t source_row = 0;
  std::int64_t source_col = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  destination_matrix destination;
  std::int64_t destination_row = 0;
  std::int64_t destination_col = 0;
};

/// The whole of `source` at row `destination_row` of `destination`.
inline fuse_copy whole(const source_matrix& source, const destination_matrix& destination,
                       std::int64_t destination_row = 0) {
  return {source, 0, 0, source.rows, source.cols, destination, destination_row, 0};
}

/// The copies that give tensor-parallel rank `rank` of `tp` its slice of a row-split fused
/// parameter: rows [rank * a_i / tp, (rank + 1) * a_i / tp) of each member i (in `members`
/// order: q, k, v or gate, up), stacked by rows into `destination` (rank r's qkv_proj is
/// [q rows of r; k rows of r; v rows of r], as vLLM lays it out). Throws
/// shardline::error(errc::invalid_argument) naming the member or destination when tp is 0,
/// rank >= tp, a member's rows do not divide by tp, or the slices' rows do not add up to the
/// destination's; errc::size_mismatch when a member's cols differ from the destination's.
inline std::vector<fuse_copy> stack_row_slices(std::span<const source_matrix> members, std::size_t tp,
                                               std::size_t rank, const destination_matrix& destination) {
  const auto fail = [&destination](errc code, const std::string& why) {
    return error(make_error_code(code), "stack_row_slices into '" + std::string(destination.name) + "': " + why);
  };
  if (tp == 0) throw fail(errc::invalid_argument, "tp is 0, it must be at least 1");
  if (rank >= tp)
    throw fail(errc::invalid_argument, "rank " + std::to_string(rank) + " does not exist (tp is " + std::to_string(tp) + ")");
  const auto t = static_cast<std::int64_t>(tp), r = static_cast<std::int64_t>(rank);
  std::vector<fuse_copy> copies;
  copies.reserve(members.size());
  std::int64_t at = 0;
  for (const source_matrix& m : members) {
    const std::string who = "member '" + std::string(m.name) + "' [" + std::to_string(m.rows) + ", " +
                            std::to_string(m.cols) + "]";
    if (m.rows < 0 || m.rows % t != 0)
      throw fail(errc::invalid_argument, who + ": " + std::to_string(m.rows) + " rows do not divide by tp " + std::to_string(tp));
    if (m.cols != destination.cols)
      throw fail(errc::size_mismatch, who + " has " + std::to_string(m.cols) + " columns, the destination " +
                                          std::to_string(destination.cols));
    const std::int64_t slice = m.rows / t;
    copies.push_back({m, r * slice, 0, slice, m.cols, destination, at, 0});
    at += slice;
  }
  if (at != destination.rows)
    throw fail(errc::invalid_argument, "the slices of rank " + std::to_string(rank) + " have " + std::to_string(at) +
                                           " rows, the destination " + std::to_string(destination.rows));
  return copies;
}

namespace detail {

inline std::int64_t pitch_of(std::int64_t row_stride, std::int64_t cols) noexcept {
  return row_stride == 0 ? cols : row_stride;
}

inline std::string range(std::int64_t first, std::int64_t count) {
  return "[" + std::to_string(first) + ", " + std::to_string(first + count) + ")";
}

template <class Matrix>
std::string check_matrix(const Matrix& m, const char* side) {
  const std::string who = std::string(side) + " '" + std::string(m.name) + "'";
  if (size_of(m.type) == 0) return who + " has an unknown dtype (value " + std::to_string(static_cast<int>(m.type)) + ")";
  if (m.rows < 0 || m.cols < 0)
    return who + " has a negative dimension: [" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "]";
  if (m.row_stride != 0 && m.row_stride < m.cols)
    return who + ": row_stride " + std::to_string(m.row_stride) + " is less than its " + std::to_string(m.cols) +
           " columns";
  if (m.data == nullptr) return who + " has no data (null)";
  if (reinterpret_cast<std::uintptr_t>(m.data) % size_of(m.type) != 0)
    return who + ": data is not aligned to its " + std::to_string(size_of(m.type)) + "-byte " +
           std::string(to_string(m.type)) + " elements";
  return {};
}

// Why copy `c` is malformed (empty when it is not); `code` gets the error's code.
inline std::string check_copy(const fuse_copy& c, errc& code) {
  code = errc::invalid_argument;
  const source_matrix& s = c.source;
  const destination_matrix& d = c.destination;
  if (auto why = check_matrix(s, "source"); !why.empty()) return why;
  if (auto why = check_matrix(d, "destination"); !why.empty()) return why;
  if (d.type == dtype::f8_e4m3 ? s.type != dtype::bf16 : s.type != d.type) {
    code = errc::layout_mismatch;
    return "source dtype " + std::string(to_string(s.type)) + " and destination dtype " +
           std::string(to_string(d.type)) + " differ (the one conversion is bf16 -> f8_e4m3)";
  }
  if (c.rows <= 0 || c.cols <= 0)
    return "the slice is empty or negative: " + std::to_string(c.rows) + " x " + std::to_string(c.cols);
  if (c.source_row < 0 || c.source_col < 0 || c.source_row > s.rows - c.rows || c.source_col > s.cols - c.cols)
    return "the slice rows " + range(c.source_row, c.rows) + " x cols " + range(c.source_col, c.cols) +
           " lies outside the source's [" + std::to_string(s.rows) + ", " + std::to_string(s.cols) + "]";
  if (c.destination_row < 0 || c.destination_col < 0 || c.destination_row > d.rows - c.rows ||
      c.destination_col > d.cols - c.cols)
    return "the slice lands at rows " + range(c.destination_row, c.rows) + " x cols " +
           range(c.destination_col, c.cols) + ", outside the destination's [" + std::to_string(d.rows) + ", " +
           std::to_string(d.cols) + "]";
  if (d.type != dtype::f8_e4m3) return {};
  const fp8_block b = d.block;
  if (b.rows < 1 || b.cols < 1)
    return "the destination's scale block is " + std::to_string(b.rows) + " x " + std::to_string(b.cols) +
           ", both dimensions must be at least 1";
  if (d.scales == nullptr) return "the destination is f8_e4m3 and has no scales (null)";
  if (reinterpret_cast<std::uintptr_t>(d.scales) % alignof(float) != 0)
    return "the destination's scales are not aligned to 4-byte floats";
  // Each block's scale comes from all its elements at once: a block must not take elements
  // from two copies.
  const auto edge = [](const char* what, std::int64_t first, std::int64_t count, std::int64_t block,
                       std::int64_t extent) -> std::string {
    if (first % block != 0)
      return std::string("the slice lands at ") + what + " " + std::to_string(first) + ", not a multiple of the " +
             std::to_string(block) + "-" + what + " scale block (a block would take elements of two copies)";
    if ((first + count) % block != 0 && first + count != extent)
      return std::string("the slice ends at ") + what + " " + std::to_string(first + count) + ", inside a " +
             std::to_string(block) + "-" + what + " scale block that goes on (the destination has " +
             std::to_string(extent) + " " + what + "s)";
    return {};
  };
  if (auto why = edge("row", c.destination_row, c.rows, b.rows, d.rows); !why.empty()) return why;
  return edge("col", c.destination_col, c.cols, b.cols, d.cols);
}

inline std::string describe_copy(const fuse_copy& c, std::size_t index) {
  return "fuse copy " + std::to_string(index) + " ('" + std::string(c.source.name) + "' -> '" +
         std::string(c.destination.name) + "')";
}

}  // namespace detail

/// Checks every copy; sets `ec` (cleared when all are well formed) and returns the reason,
/// naming the copy's index, source and destination, e.g. "fuse copy 1 ('k_proj' -> 'qkv_proj'):
/// the slice rows [64, 192) x cols [0, 64) lies outside the source's [128, 64]". Codes:
/// errc::layout_mismatch for dtypes that neither agree nor are bf16 -> f8_e4m3;
/// errc::invalid_argument for anything else: an unknown dtype, a negative dimension, a
/// row_stride below cols, null or misaligned data, an empty slice, a slice outside its source
/// or destination, and for f8_e4m3 destinations missing scales, a block dimension below 1, or
/// a slice that does not start (and end, unless at the edge) on a block boundary.
inline std::string check_fuse_copies(std::span<const fuse_copy> copies, std::error_code& ec) {
  ec.clear();
  for (std::size_t i = 0; i < copies.size(); ++i) {
    errc code{};
    if (std::string why = detail::check_copy(copies[i], code); !why.empty()) {
      ec = make_error_code(code);
      return detail::describe_copy(copies[i], i) + ": " + why;
    }
  }
  return {};
}

/// The throwing overload: shardline::error with check_fuse_copies' code and message.
inline void check_fuse_copies(std::span<const fuse_copy> copies) {
  std::error_code ec;
  std::string why = check_fuse_copies(copies, ec);
  shardline::throw_if(ec, why);
}

/// The CPU reference (and a host loader): performs `copies` whose data and scales are host
/// memory, as enqueue_fuse does on a GPU, byte for byte. Throws as check_fuse_copies, before
/// touching any memory.
inline void fuse_on_host(std::span<const fuse_copy> copies) {
  check_fuse_copies(copies);
  for (const fuse_copy& c : copies) {
    const source_matrix& s = c.source;
    const destination_matrix& d = c.destination;
    const std::int64_t sp = detail::pitch_of(s.row_stride, s.cols), dp = detail::pitch_of(d.row_stride, d.cols);
    if (d.type == dtype::f8_e4m3) {
      const auto* src = static_cast<const std::uint16_t*>(s.data) + c.source_row * sp + c.source_col;
      auto* dst = static_cast<std::uint8_t*>(d.data) + c.destination_row * dp + c.destination_col;
      const std::int64_t scale_pitch = (d.cols + d.block.cols - 1) / d.block.cols;
      float* scales = d.scales + (c.destination_row / d.block.rows) * scale_pitch + c.destination_col / d.block.cols;
      quantize_e4m3_on_host(src, sp, dst, dp, scales, scale_pitch, c.rows, c.cols, d.block);
      continue;
    }
    const auto e = static_cast<std::int64_t>(size_of(s.type));
    const auto* src = static_cast<const std::byte*>(s.data) + (c.source_row * sp + c.source_col) * e;
    auto* dst = static_cast<std::byte*>(d.data) + (c.destination_row * dp + c.destination_col) * e;
    for (std::int64_t r = 0; r < c.rows; ++r)
      std::memcpy(dst + r * dp * e, src + r * sp * e, static_cast<std::size_t>(c.cols * e));
  }
}

}  // namespace shardline::cuda
