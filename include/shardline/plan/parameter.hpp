// shardline/plan/parameter.hpp: element types and parameter descriptors (name, dtype, shape).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace shardline {

/// Element types of weights as they travel: the destination (inference) dtype.
enum class dtype : std::uint8_t { f32, f16, bf16, f8_e4m3, i8, i32, i64 };

/// Bytes per element; 0 for a value outside the enum.
inline std::size_t size_of(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::f16: return 2;
    case dtype::bf16: return 2;
    case dtype::f8_e4m3: return 1;
    case dtype::i8: return 1;
    case dtype::i32: return 4;
    case dtype::i64: return 8;
  }
  return 0;
}

/// The dtype's short name ("bf16", "f8_e4m3", ...); "unknown" outside the enum.
inline std::string_view to_string(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::f16: return "f16";
    case dtype::bf16: return "bf16";
    case dtype::f8_e4m3: return "f8_e4m3";
    case dtype::i8: return "i8";
    case dtype::i32: return "i32";
    case dtype::i64: return "i64";
  }
  return "unknown";
}

/// A named tensor: a trainer's source tensor or a receiver's destination parameter.
/// Row-major, dense. A shape with a negative dimension is malformed; shard_map::fuse and
/// transfer_plan::build reject it (elements() counts such a dimension as 0).
struct parameter_descriptor {
  std::string name;
  dtype type = dtype::bf16;
  std::vector<std::int64_t> shape;

  /// Product of the dimensions (1 for a scalar, shape {}).
  std::uint64_t elements() const noexcept {
    std::uint64_t n = 1;
    for (std::int64_t d : shape) n *= d > 0 ? static_cast<std::uint64_t>(d) : 0;
    return n;
  }
  /// elements() * size_of(type).
  std::uint64_t bytes() const noexcept { return elements() * size_of(type); }

  friend bool operator==(const parameter_descriptor&, const parameter_descriptor&) = default;
};

/// "[8, 16]", for messages.
inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// "'name' bf16 [8, 16]", for messages.
inline std::string describe(const parameter_descriptor& p) {
  return "'" + p.name + "' " + std::string(to_string(p.type)) + " " + shape_string(p.shape);
}

}  // namespace shardline
