// shardline/cuda/fp8.hpp: the fp8 e4m3 format, its block scales (one f32 per 128 x 128 block
// of a weight, DeepSeek-V3 style) as a parameter of their own, and the CPU reference quantizer
// the GPU kernel (shardline/cuda/fuse.cuh) matches bit for bit. Plain C++: no CUDA needed.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/plan/parameter.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace shardline::cuda {

/// The OCP "FN" e4m3 format (what dtype::f8_e4m3 and CUDA's __nv_fp8_e4m3 hold): 1 sign bit,
/// 4 exponent bits (bias 7), 3 mantissa bits; no infinity; 0x7f and 0xff are NaN; the largest
/// finite magnitude is 448 (0x7e), the smallest normal 2^-6, the smallest subnormal 2^-9.
struct e4m3 {
  static constexpr float max = 448.0f;
  static constexpr std::uint8_t max_bits = 0x7e;
  static constexpr std::uint8_t nan_bits = 0x7f;
};

/// float -> e4m3 as the GPU's saturating conversion does it (PTX cvt.rn.satfinite.e4m3x2.f32,
/// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)): round to nearest, ties to even, in
/// the subnormal range too; a magnitude beyond 448 (infinity included) becomes +-448; NaN
/// becomes 0x7f whatever its sign; a value that rounds to zero keeps its sign (-0 is 0x80).
inline std::uint8_t to_e4m3(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint8_t>((bits >> 24) & 0x80u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return e4m3::nan_bits;
  if (magnitude > std::bit_cast<std::uint32_t>(e4m3::max)) return sign | e4m3::max_bits;
  // Drops the low `shift` bits of `v`, rounding to nearest even.
  const auto round_off = [](std::uint32_t v, unsigned shift) -> std::uint32_t {
    if (shift >= 32) return 0;
    const std::uint32_t kept = v >> shift, rest = v & ((1u << shift) - 1), half = 1u << (shift - 1);
    return kept + (rest > half || (rest == half && (kept & 1u)) ? 1u : 0u);
  };
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (exponent >= -6) {
    // A normal e4m3: rebias the exponent and round the 23-bit mantissa to 3 bits; a carry out
    // of the mantissa moves into the exponent, as it should (at most to 448, checked above).
    const std::uint32_t rebased = (static_cast<std::uint32_t>(exponent + 7) << 23) | (magnitude & 0x7fffffu);
    return sign | static_cast<std::uint8_t>(round_off(rebased, 20));
  }
  if (exponent == -127) return sign;  // a float subnormal is far below 2^-10: rounds to zero
  // Subnormal e4m3: the value in units of 2^-9, rounded; 8 units is the smallest normal,
  // whose encoding (0x08) is exactly that count.
  const std::uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  return sign | static_cast<std::uint8_t>(round_off(significand, static_cast<unsigned>(14 - exponent)));
}

/// e4m3 -> float, exactly (every e4m3 value is a float).
inline float from_e4m3(std::uint8_t bits) noexcept {
  const unsigned exponent = (bits >> 3) & 0xfu, mantissa = bits & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(static_cast<float>(8 + mantissa), static_cast<int>(exponent) - 10);
  return bits & 0x80u ? -magnitude : magnitude;
}

/// The elements one scale covers: a `rows` x `cols` block of a row-major 2-D weight (the last
/// two dims of a higher-rank one); a 1-D weight is cut into blocks of `cols` elements.
/// DeepSeek-V3-style checkpoints, vLLM and SGLang use 128 x 128.
struct fp8_block {
  std::int64_t rows = 128;
  std::int64_t cols = 128;
  friend bool operator==(const fp8_block&, const fp8_block&) = default;
};

/// The scale of one block. Convention (DeepSeek-V3's `weight_scale_inv`): `inverse` is the
/// dequantization multiplier, stored in the scale parameter, original ~= from_e4m3(q) *
/// inverse; `multiplier` is what the quantizer multiplies each element by before converting.
struct fp8_scale {
  float inverse = 1.0f;
  float multiplier = 1.0f;
};

/// A block whose largest finite magnitude is below this (all zeros, say) is scaled as if it
/// were this, so that no scale is 0 and no multiplier infinite; all its values round to
/// zero or near it. (vLLM floors its per-group scales the same way.)
inline constexpr float fp8_min_amax = 0x1p-32f;

/// The scale of a block whose largest finite magnitude (NaN and infinities left out) is
/// `amax`: inverse = amax / 448, multiplier = 448 / amax, both correctly rounded floats, so
/// the block's largest element maps to 448 (saturating, should rounding push it past).
inline fp8_scale fp8_scale_for(float amax) noexcept {
  const float a = std::max(amax, fp8_min_amax);
  return {a / e4m3::max, e4m3::max / a};
}

/// Whether `value` counts towards a block's amax: finite values do; NaN (which stays NaN) and
/// infinities (which saturate to +-448) do not.
inline bool counts_for_amax(float value) noexcept { return std::fabs(value) <= std::numeric_limits<float>::max(); }

/// The name of `weight`'s scale parameter: "<weight>_scale_inv", so
/// "model.layers.0.self_attn.qkv_proj.weight" -> "model.layers.0.self_attn.qkv_proj.weight_scale_inv"
/// (DeepSeek-V3's and vLLM's name).
inline std::string fp8_scale_name(std::string_view weight) { return std::string(weight) + "_scale_inv"; }

/// The shape of the scales of a weight of shape `weight`: f32, [ceil(n / cols)] for a 1-D
/// [n]; [..., ceil(r / rows), ceil(c / cols)] for [..., r, c] (leading dims, MoE experts say,
/// kept). Throws shardline::error(errc::invalid_argument) naming `name` for a scalar, a
/// negative dimension, or a block with a dimension below 1.
inline std::vector<std::int64_t> fp8_scale_shape(std::string_view name, const std::vector<std::int64_t>& weight,
                                                 fp8_block block = {}) {
  const auto fail = [name](const std::string& why) {
    return error(make_error_code(errc::invalid_argument), "fp8 scales of '" + std::string(name) + "': " + why);
  };
  if (block.rows < 1 || block.cols < 1)
    throw fail("the block is " + std::to_string(block.rows) + " x " + std::to_string(block.cols) +
               ", both dimensions must be at least 1");
  if (weight.empty()) throw fail("a scalar is not block-quantized");
  for (auto d : weight)
    if (d < 0) throw fail("negative dimension in shape " + shape_string(weight));
  const auto blocks = [](std::int64_t n, std::int64_t b) { return (n + b - 1) / b; };
  std::vector<std::int64_t> shape(weight);
  shape.back() = blocks(weight.back(), block.cols);
  if (shape.size() >= 2) shape[shape.size() - 2] = blocks(weight[weight.size() - 2], block.rows);
  return shape;
}

/// The scale parameter a receiver of the fp8 `weight` exposes beside it: fp8_scale_name,
/// dtype f32, fp8_scale_shape. Throws as fp8_scale_shape, and shardline::error(
/// errc::layout_mismatch) naming the weight when it is not f8_e4m3.
inline parameter_descriptor fp8_scale_parameter(const parameter_descriptor& weight, fp8_block block = {}) {
  if (weight.type != dtype::f8_e4m3)
    throw error(make_error_code(errc::layout_mismatch),
                "fp8 scales of " + describe(weight) + ": the weight is not f8_e4m3");
  return {fp8_scale_name(weight.name), dtype::f32, fp8_scale_shape(weight.name, weight.shape, block)};
}

/// As fp8_scale_parameter, for a receiver's tensor_layout.
inline tensor_layout fp8_scale_layout(std::string_view name, const tensor_layout& weight, fp8_block block = {}) {
  if (weight.type != dtype::f8_e4m3)
    throw error(make_error_code(errc::layout_mismatch), "fp8 scales of '" + std::string(name) + "' " +
                                                            to_string(weight) + ": the weight is not f8_e4m3");
  return {dtype::f32, fp8_scale_shape(name, weight.shape, block)};
}

/// The CPU reference of the quantizer: bf16 `rows` x `cols` at `source` (row pitch
/// `source_stride` elements) -> e4m3 at `destination` (pitch `destination_stride` bytes), one
/// scale per `block` at `scales` (pitch `scale_stride` floats), blocks counted from the first
/// element. Every byte and scale equals the GPU kernel's. No checks: fuse_on_host validates.
inline void quantize_e4m3_on_host(const std::uint16_t* source, std::int64_t source_stride, std::uint8_t* destination,
                                  std::int64_t destination_stride, float* scales, std::int64_t scale_stride,
                                  std::int64_t rows, std::int64_t cols, fp8_block block = {}) {
  const auto at = [&](std::int64_t r, std::int64_t c) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(source[r * source_stride + c]) << 16);
  };
  for (std::int64_t r0 = 0; r0 < rows; r0 += block.rows)
    for (std::int64_t c0 = 0; c0 < cols; c0 += block.cols) {
      const std::int64_t r1 = std::min(rows, r0 + block.rows), c1 = std::min(cols, c0 + block.cols);
      float amax = 0;
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t c = c0; c < c1; ++c)
          if (const float v = at(r, c); counts_for_amax(v)) amax = std::max(amax, std::fabs(v));
      const fp8_scale s = fp8_scale_for(amax);
      scales[(r0 / block.rows) * scale_stride + c0 / block.cols] = s.inverse;
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t c = c0; c < c1; ++c) destination[r * destination_stride + c] = to_e4m3(at(r, c) * s.multiplier);
    }
}

}  // namespace shardline::cuda
