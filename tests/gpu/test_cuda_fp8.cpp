// The fp8 e4m3 format and block scales: the CPU reference against hand-computed values and an
// independent nearest-value search (no GPU), then the GPU quantizer against the CPU reference
// on random bf16 data, every byte and scale (test suite "gpu").
#include <shardline/cuda/fp8.hpp>

#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/fuse.hpp>
#include <shardline/cuda/stream.hpp>
#include <shardline/plan/convert.hpp>

#include <doctest/doctest.h>

#include "gpu_kernels.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace cuda = shardline::cuda;
namespace sl = shardline;

namespace {

std::string what_of(auto&& f) {
  try {
    f();
  } catch (const sl::error& e) {
    return e.what();
  }
  return "(nothing thrown)";
}

// The e4m3 value nearest to `v` by searching all 127 finite magnitudes, ties to the even
// encoding, beyond 448 saturating: an implementation independent of to_e4m3's bit tricks.
std::uint8_t nearest_e4m3(float v) {
  if (std::isnan(v)) return 0x7f;
  const std::uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  const double a = std::fabs(static_cast<double>(v));
  if (a > 448) return sign | 0x7e;
  std::uint8_t best = 0;
  for (std::uint8_t b = 1; b <= 0x7e; ++b) {
    const double d = std::fabs(cuda::from_e4m3(b) - a), e = std::fabs(cuda::from_e4m3(best) - a);
    if (d < e || (d == e && (b & 1) == 0)) best = b;
  }
  return sign | best;
}

float bits_to_float(std::uint32_t b) { return std::bit_cast<float>(b); }

}  // namespace

TEST_CASE("to_e4m3: hand-computed values, saturation, subnormals, NaN and ties to even") {
  CHECK(cuda::to_e4m3(0.0f) == 0x00);
  CHECK(cuda::to_e4m3(-0.0f) == 0x80);
  CHECK(cuda::to_e4m3(1.0f) == 0x38);     // 0 0111 000
  CHECK(cuda::to_e4m3(-2.0f) == 0xc0);    // 1 1000 000
  CHECK(cuda::to_e4m3(0.1f) == 0x1d);     // 1.6 * 2^-4 -> 1.625 * 2^-4: 0 0011 101
  CHECK(cuda::to_e4m3(240.0f) == 0x77);   // 1.875 * 2^7: 0 1110 111
  CHECK(cuda::to_e4m3(448.0f) == 0x7e);   // the largest finite
  CHECK(cuda::to_e4m3(-448.0f) == 0xfe);
  // Saturation: past 448 (464, the midpoint to the missing 480, included), infinity included.
  CHECK(cuda::to_e4m3(449.0f) == 0x7e);
  CHECK(cuda::to_e4m3(464.0f) == 0x7e);
  CHECK(cuda::to_e4m3(1e30f) == 0x7e);
  CHECK(cuda::to_e4m3(-1e30f) == 0xfe);
  CHECK(cuda::to_e4m3(std::numeric_limits<float>::infinity()) == 0x7e);
  CHECK(cuda::to_e4m3(-std::numeric_limits<float>::infinity()) == 0xfe);
  // NaN stays NaN, its sign dropped (as the CUDA conversion does).
  CHECK(cuda::to_e4m3(std::numeric_limits<float>::quiet_NaN()) == 0x7f);
  CHECK(cuda::to_e4m3(-std::numeric_limits<float>::quiet_NaN()) == 0x7f);
  CHECK(cuda::to_e4m3(bits_to_float(0x7f800001u)) == 0x7f);  // a signalling NaN
  // Ties to even among normals: 1 + 1/16 lies between 1 (m 0) and 1.125 (m 1); 1 + 3/16
  // between 1.125 (m 1) and 1.25 (m 2); just past a tie rounds up.
  CHECK(cuda::to_e4m3(1.0625f) == 0x38);
  CHECK(cuda::to_e4m3(1.1875f) == 0x3a);
  CHECK(cuda::to_e4m3(std::nextafter(1.0625f, 2.0f)) == 0x39);
  CHECK(cuda::to_e4m3(std::nextafter(1.0625f, 0.0f)) == 0x38);
  // A mantissa carry into the exponent: 1.9375 (between 1.875 and 2) goes to 2.
  CHECK(cuda::to_e4m3(1.9375f) == 0x40);
  // Subnormals, in units of 2^-9.
  CHECK(cuda::to_e4m3(std::ldexp(1.0f, -9)) == 0x01);
  CHECK(cuda::to_e4m3(std::ldexp(7.0f, -9)) == 0x07);         // the largest subnormal
  CHECK(cuda::to_e4m3(std::ldexp(1.0f, -6)) == 0x08);         // the smallest normal
  CHECK(cuda::to_e4m3(std::ldexp(7.5f, -9)) == 0x08);         // a tie, to even: up to 2^-6
  CHECK(cuda::to_e4m3(std::ldexp(1.5f, -9)) == 0x02);         // tie between 1 and 2 units
  CHECK(cuda::to_e4m3(std::ldexp(2.5f, -9)) == 0x02);         // tie between 2 and 3 units
  CHECK(cuda::to_e4m3(-std::ldexp(3.0f, -9)) == 0x83);
  CHECK(cuda::to_e4m3(std::ldexp(1.0f, -10)) == 0x00);        // half a unit: a tie, to 0
  CHECK(cuda::to_e4m3(std::nextafter(std::ldexp(1.0f, -10), 1.0f)) == 0x01);
  CHECK(cuda::to_e4m3(-std::ldexp(1.0f, -11)) == 0x80);       // underflows, keeps its sign
  CHECK(cuda::to_e4m3(1e-40f) == 0x00);                       // a float subnormal
}

TEST_CASE("to_e4m3: every finite e4m3 value converts back to itself") {
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7f) == 0x7f) continue;
    CAPTURE(b);
    CHECK(cuda::to_e4m3(cuda::from_e4m3(static_cast<std::uint8_t>(b))) == b);
  }
  CHECK(std::isnan(cuda::from_e4m3(0x7f)));
  CHECK(std::isnan(cuda::from_e4m3(0xff)));
  CHECK(cuda::from_e4m3(0x7e) == 448.0f);
  CHECK(cuda::from_e4m3(0x01) == std::ldexp(1.0f, -9));
}

TEST_CASE("to_e4m3: agrees with a nearest-value search on midpoints and random floats") {
  std::vector<float> values;
  // Every midpoint between neighbouring values, and the floats either side of it.
  for (std::uint8_t b = 0; b < 0x7e; ++b) {
    const float mid = (cuda::from_e4m3(b) + cuda::from_e4m3(static_cast<std::uint8_t>(b + 1))) / 2;
    for (float v : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f)}) {
      values.push_back(v);
      values.push_back(-v);
    }
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> exponent(-14.0f, 10.0f), unit(-1.0f, 1.0f);
  for (int i = 0; i < 20000; ++i) values.push_back(unit(rng) * std::exp2(exponent(rng)));
  int wrong = 0;
  for (float v : values)
    if (cuda::to_e4m3(v) != nearest_e4m3(v) && ++wrong <= 5)
      FAIL_CHECK("to_e4m3(" << v << ") = " << int(cuda::to_e4m3(v)) << ", nearest is " << int(nearest_e4m3(v)));
  CHECK(wrong == 0);
}

TEST_CASE("fp8_scale_for: amax maps to 448; a block of zeros gets the floor, never a zero scale") {
  const auto s = cuda::fp8_scale_for(448.0f);
  CHECK(s.inverse == 1.0f);
  CHECK(s.multiplier == 1.0f);
  const auto t = cuda::fp8_scale_for(3.5f);
  CHECK(t.inverse == 3.5f / 448.0f);
  CHECK(t.multiplier == 128.0f);
  const auto z = cuda::fp8_scale_for(0.0f);
  CHECK(z.inverse == cuda::fp8_min_amax / 448.0f);
  CHECK(std::isfinite(z.multiplier));
  CHECK(z.inverse > 0.0f);
}

TEST_CASE("quantize_e4m3_on_host: hand-computed blocks, NaN and infinity left out of amax") {
  // 2 x 3 with 2 x 2 blocks: block (0, 0) holds 1, -2, 0.5, 4; block (0, 1) holds 3 and NaN
  // in column 2... and a second case below with infinity.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> values = {1.0f, -2.0f, 3.0f,  //
                                     0.5f, 4.0f, nan};
  std::vector<std::uint16_t> in;
  for (float v : values) in.push_back(sl::to_bf16(v));
  std::vector<std::uint8_t> out(6, 0xaa);
  std::vector<float> scales(2, -1.0f);
  cuda::quantize_e4m3_on_host(in.data(), 3, out.data(), 3, scales.data(), 2, 2, 3, {2, 2});
  // Block (0, 0): amax 4, multiplier 112: 112 = 0x6e, -224 = 0xf6, 56 = 0x66, 448 = 0x7e.
  CHECK(scales[0] == 4.0f / 448.0f);
  CHECK(out[0] == 0x6e);
  CHECK(out[1] == 0xf6);
  CHECK(out[3] == 0x66);
  CHECK(out[4] == 0x7e);
  // Block (0, 1): amax 3 (NaN left out); 3 * (448 / 3) rounds to 448 or just past: 0x7e either way.
  CHECK(scales[1] == 3.0f / 448.0f);
  CHECK(out[2] == 0x7e);
  CHECK(out[5] == 0x7f);

  // An infinity does not set the scale: it saturates; 0.25 is the block's amax.
  const std::vector<std::uint16_t> with_inf = {sl::to_bf16(std::numeric_limits<float>::infinity()),
                                               sl::to_bf16(-0.25f), sl::to_bf16(0.125f), sl::to_bf16(1e-30f)};
  std::vector<std::uint8_t> q(4);
  float scale = 0;
  cuda::quantize_e4m3_on_host(with_inf.data(), 4, q.data(), 4, &scale, 1, 1, 4, {1, 128});
  CHECK(scale == 0.25f / 448.0f);
  CHECK(q[0] == 0x7e);
  CHECK(q[1] == 0xfe);
  CHECK(q[2] == cuda::to_e4m3(224.0f));
  CHECK(q[3] == 0x00);
}

TEST_CASE("fp8 scale parameter: name, dtype and shape per block, DeepSeek-V3 style") {
  CHECK(cuda::fp8_scale_name("model.layers.0.mlp.gate_up_proj.weight") ==
        "model.layers.0.mlp.gate_up_proj.weight_scale_inv");
  CHECK(cuda::fp8_scale_shape("w", {7168, 2048}) == std::vector<std::int64_t>{56, 16});
  CHECK(cuda::fp8_scale_shape("w", {576, 7168}) == std::vector<std::int64_t>{5, 56});
  CHECK(cuda::fp8_scale_shape("w", {129}) == std::vector<std::int64_t>{2});
  CHECK(cuda::fp8_scale_shape("w", {128}) == std::vector<std::int64_t>{1});
  CHECK(cuda::fp8_scale_shape("w", {4, 256, 130}) == std::vector<std::int64_t>{4, 2, 2});
  CHECK(cuda::fp8_scale_shape("w", {100, 100}, {64, 32}) == std::vector<std::int64_t>{2, 4});

  const sl::parameter_descriptor w{"m.qkv_proj.weight", sl::dtype::f8_e4m3, {1280, 8192}};
  const auto p = cuda::fp8_scale_parameter(w);
  CHECK(p.name == "m.qkv_proj.weight_scale_inv");
  CHECK(p.type == sl::dtype::f32);
  CHECK(p.shape == std::vector<std::int64_t>{10, 64});
  const auto l = cuda::fp8_scale_layout("m.qkv_proj.weight", {sl::dtype::f8_e4m3, {1280, 8192}});
  CHECK(l == sl::tensor_layout{sl::dtype::f32, {10, 64}});
}

TEST_CASE("fp8 scale parameter: bad inputs are refused, naming the weight") {
  CHECK(what_of([] { (void)cuda::fp8_scale_shape("m.norm", {}); }) == "fp8 scales of 'm.norm': a scalar is not block-quantized: invalid argument");
  CHECK(what_of([] { (void)cuda::fp8_scale_shape("w", {8, 8}, {0, 128}); }) ==
        "fp8 scales of 'w': the block is 0 x 128, both dimensions must be at least 1: invalid argument");
  CHECK(what_of([] { (void)cuda::fp8_scale_shape("w", {8, -1}); }) ==
        "fp8 scales of 'w': negative dimension in shape [8, -1]: invalid argument");
  CHECK(what_of([] { (void)cuda::fp8_scale_parameter({"w", sl::dtype::bf16, {8, 8}}); }) ==
        "fp8 scales of 'w' bf16 [8, 8]: the weight is not f8_e4m3: dtype or shape differ");
  CHECK(what_of([] { (void)cuda::fp8_scale_layout("w", {sl::dtype::f16, {8, 8}}); }) ==
        "fp8 scales of 'w' f16 [8, 8]: the weight is not f8_e4m3: dtype or shape differ");
  std::error_code ec;
  try {
    (void)cuda::fp8_scale_parameter({"w", sl::dtype::bf16, {8, 8}});
  } catch (const sl::error& e) {
    ec = e.code();
  }
  CHECK(ec == sl::errc::layout_mismatch);
}

namespace {

// Random weight-like bf16 with what quantization must get right mixed in: large magnitudes
// (1e30, which set a block's scale), infinities (which saturate), NaN, values far below a
// block's amax (e4m3 subnormals and zeros), a block of zeros and a block of values below the
// amax floor. Never all zeros.
std::vector<std::uint16_t> random_bf16(std::size_t rows, std::size_t cols, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> weight(0.0f, 0.02f);
  std::uniform_int_distribution<int> pick(0, 99999);
  std::vector<std::uint16_t> v(rows * cols);
  for (auto& x : v) {
    float f = weight(rng);
    const int p = pick(rng);
    if (p < 2) f = 1e30f;  // rare: most blocks keep an ordinary scale
    else if (p < 202) f = -std::numeric_limits<float>::infinity();
    else if (p < 402) f = std::numeric_limits<float>::quiet_NaN();
    else if (p < 2402) f *= 1e-4f;
    else if (p < 4402) f *= 1e-6f;
    else if (p < 4602) f = -0.0f;
    x = sl::to_bf16(f);
  }
  for (std::size_t r = 0; r < std::min<std::size_t>(rows, 128); ++r)
    for (std::size_t c = 0; c < std::min<std::size_t>(cols, 128); ++c) {
      if (cols > 256) v[r * cols + c] = sl::to_bf16(0.0f);  // block (0, 0): all zeros
      if (cols > 384) v[r * cols + 128 + c] = sl::to_bf16(1e-12f * weight(rng));  // below the floor
    }
  return v;
}

template <class T>
cuda::device_buffer upload(const std::vector<T>& host) {
  cuda::device_buffer d(host.size() * sizeof(T), 0);
  REQUIRE(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  return d;
}

template <class T>
std::vector<T> download(const cuda::device_buffer& d) {
  std::vector<T> host(d.size() / sizeof(T));
  REQUIRE(cudaMemcpy(host.data(), d.data(), d.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
  return host;
}

// Quantizes a rows x cols bf16 tensor on the GPU and on the CPU; compares every byte and scale.
void check_quantize(std::int64_t rows, std::int64_t cols, cuda::fp8_block block, std::uint32_t seed) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(block.rows);
  CAPTURE(block.cols);
  const auto input = random_bf16(static_cast<std::size_t>(rows), static_cast<std::size_t>(cols), seed);
  const auto scale_shape = cuda::fp8_scale_shape("w", {rows, cols}, block);
  const std::size_t n_scales = static_cast<std::size_t>(scale_shape[0] * scale_shape[1]);

  std::vector<std::uint8_t> expected(input.size(), 0xaa);
  std::vector<float> expected_scales(n_scales, -1.0f);
  cuda::fuse_on_host(std::vector{cuda::whole({"w", input.data(), sl::dtype::bf16, rows, cols},
                                             {"w_fp8", expected.data(), sl::dtype::f8_e4m3, rows, cols, 0,
                                              expected_scales.data(), block})});

  cuda::stream s(0);
  const auto source = upload(input);
  cuda::device_buffer out(input.size(), 0), scales(n_scales * sizeof(float), 0);
  REQUIRE(cudaMemset(out.data(), 0xaa, out.size()) == cudaSuccess);
  REQUIRE(cudaMemset(scales.data(), 0xff, scales.size()) == cudaSuccess);
  const std::vector copies{cuda::whole({"w", source.data(), sl::dtype::bf16, rows, cols},
                                       {"w_fp8", out.data(), sl::dtype::f8_e4m3, rows, cols, 0,
                                        reinterpret_cast<float*>(scales.data()), block})};
  gpu_test::fuse(copies.data(), copies.size(), s.native_handle());
  s.synchronize();
  const auto got = download<std::uint8_t>(out);
  const auto got_scales = download<float>(scales);

  std::size_t wrong = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (got[i] != expected[i] && ++wrong <= 5)
      FAIL_CHECK("byte " << i << " (row " << i / cols << ", col " << i % cols << ", bf16 0x" << std::hex
                         << input[i] << "): GPU 0x" << int(got[i]) << ", CPU 0x" << int(expected[i]) << std::dec);
  CHECK(wrong == 0);
  std::size_t wrong_scales = 0;
  for (std::size_t i = 0; i < n_scales; ++i)
    if (std::bit_cast<std::uint32_t>(got_scales[i]) != std::bit_cast<std::uint32_t>(expected_scales[i]) &&
        ++wrong_scales <= 5)
      FAIL_CHECK("scale " << i << ": GPU " << got_scales[i] << ", CPU " << expected_scales[i]);
  CHECK(wrong_scales == 0);
  // The data was not trivial: most bytes are neither zero nor saturated.
  std::size_t ordinary = 0;
  for (auto b : expected) ordinary += (b & 0x7f) != 0 && (b & 0x7f) < 0x7e;
  CHECK(ordinary > expected.size() / 2);
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("quantize on the GPU: every byte and scale equals the CPU reference (16-byte path)") {
    check_quantize(384, 1024, {}, 1);
    check_quantize(300, 520, {}, 2);  // partial blocks at both edges
    check_quantize(1, 4096, {}, 3);   // a vector: one row of 128-element blocks
    check_quantize(256, 512, {64, 32}, 4);
  }

  TEST_CASE("quantize on the GPU: every byte and scale equals the CPU reference (element path)") {
    check_quantize(130, 203, {}, 5);      // odd columns: no 16-byte access lines up
    check_quantize(200, 640, {128, 100}, 6);  // block columns not a multiple of 8
  }
}
