// shardline/plan/convert.hpp: dtype conversions loaders need on the way into the inference layout.
#pragma once

#include <shardline/error.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

namespace shardline {

/// float32 -> bfloat16, round to nearest even; NaN stays NaN (quiet).
inline std::uint16_t to_bf16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40);
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

inline float from_bf16(std::uint16_t value) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(value) << 16);
}

/// Converts `source` into `destination` (2 bytes per element, host byte order).
/// Throws shardline::error(errc::size_mismatch) when the sizes disagree.
inline void convert_f32_to_bf16(std::span<const float> source, std::span<std::byte> destination) {
  if (destination.size() != source.size() * 2)
    throw error(make_error_code(errc::size_mismatch),
                "convert_f32_to_bf16: " + std::to_string(source.size()) + " elements need " +
                    std::to_string(source.size() * 2) + " bytes, the destination has " +
                    std::to_string(destination.size()));
  auto* out = destination.data();
  for (std::size_t i = 0; i < source.size(); ++i) {
    const std::uint16_t h = to_bf16(source[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

}  // namespace shardline
