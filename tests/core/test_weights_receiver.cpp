#include <shardline/weights_receiver.hpp>

#include <shardline/convert.hpp>
#include <shardline/loopback_transport.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace sl = shardline;

TEST_CASE("weights_receiver: lays parameters out aligned in one arena and exposes each") {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  sl::weights_receiver weights(endpoint, {{"a", sl::dtype::bf16, {3}}, {"b", sl::dtype::f32, {4}}},
                               256);
  CHECK(weights.parameter("a").size() == 6);
  CHECK(weights.parameter("b").size() == 16);
  CHECK(weights.parameter("b").data() - weights.parameter("a").data() == 256);
  REQUIRE(endpoint.regions().size() == 2);
  CHECK(endpoint.regions().find("b")->length == 16);
  CHECK(!weights.committed_version().has_value());
}

TEST_CASE("weights_receiver: a parameter given twice or an unknown name is an error naming it") {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  try {
    sl::weights_receiver twice(endpoint, {{"w", sl::dtype::bf16, {2}}, {"w", sl::dtype::bf16, {2}}});
    FAIL("a duplicate parameter was accepted");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::invalid_argument);
    CHECK(std::string(e.what()).find("'w' given twice") != std::string::npos);
  }
  sl::loopback_transport::receiver other(io.get_executor());
  sl::weights_receiver weights(other, {{"w", sl::dtype::bf16, {2}}});
  try {
    weights.parameter("nope");
    FAIL("an unknown parameter was found");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::unknown_parameter);
    CHECK(std::string(e.what()).find("'nope'") != std::string::npos);
  }
}

TEST_CASE("convert: f32 -> bf16 rounds to nearest even and checks sizes") {
  CHECK(sl::to_bf16(1.0f) == 0x3f80);
  CHECK(sl::from_bf16(sl::to_bf16(-2.5f)) == -2.5f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
  CHECK(sl::to_bf16(1.0f + 1.0f / 256) == 0x3f80);
  CHECK(sl::to_bf16(1.0f + 3.0f / 256) == 0x3f82);
  const std::vector<float> source{1.0f, 2.0f};
  std::vector<std::byte> out(4);
  sl::convert_f32_to_bf16(source, out);
  std::uint16_t second = 0;
  std::memcpy(&second, out.data() + 2, 2);
  CHECK(second == 0x4000);
  std::vector<std::byte> small(3);
  CHECK_THROWS_WITH_AS(sl::convert_f32_to_bf16(source, small),
                       doctest::Contains("2 elements need 4 bytes, the destination has 3"),
                       sl::error);
}
