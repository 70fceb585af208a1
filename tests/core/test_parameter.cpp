#include <shardline/plan/parameter.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace sl = shardline;

TEST_CASE("parameter: every dtype has its element size and name") {
  CHECK(sl::size_of(sl::dtype::f32) == 4);
  CHECK(sl::size_of(sl::dtype::f16) == 2);
  CHECK(sl::size_of(sl::dtype::bf16) == 2);
  CHECK(sl::size_of(sl::dtype::f8_e4m3) == 1);
  CHECK(sl::size_of(sl::dtype::i8) == 1);
  CHECK(sl::size_of(sl::dtype::i32) == 4);
  CHECK(sl::size_of(sl::dtype::i64) == 8);
  CHECK(sl::to_string(sl::dtype::f32) == "f32");
  CHECK(sl::to_string(sl::dtype::f16) == "f16");
  CHECK(sl::to_string(sl::dtype::bf16) == "bf16");
  CHECK(sl::to_string(sl::dtype::f8_e4m3) == "f8_e4m3");
  CHECK(sl::to_string(sl::dtype::i8) == "i8");
  CHECK(sl::to_string(sl::dtype::i32) == "i32");
  CHECK(sl::to_string(sl::dtype::i64) == "i64");
}

TEST_CASE("parameter: a value outside the dtype enum has size 0 and name unknown") {
  const auto bogus = static_cast<sl::dtype>(200);
  CHECK(sl::size_of(bogus) == 0);
  CHECK(sl::to_string(bogus) == "unknown");
}

TEST_CASE("parameter: elements and bytes follow shape and dtype") {
  sl::parameter_descriptor p{"model.layers.0.self_attn.q_proj.weight", sl::dtype::bf16, {16, 8}};
  CHECK(p.elements() == 128);
  CHECK(p.bytes() == 256);
  p.type = sl::dtype::f32;
  CHECK(p.bytes() == 512);
  p.type = sl::dtype::i64;
  p.shape = {2, 3, 5};
  CHECK(p.elements() == 30);
  CHECK(p.bytes() == 240);
}

TEST_CASE("parameter: a scalar has one element, an empty dimension none") {
  const sl::parameter_descriptor scalar{"scale", sl::dtype::f32, {}};
  CHECK(scalar.elements() == 1);
  CHECK(scalar.bytes() == 4);
  const sl::parameter_descriptor empty{"empty", sl::dtype::f32, {4, 0, 3}};
  CHECK(empty.elements() == 0);
  CHECK(empty.bytes() == 0);
}

TEST_CASE("parameter: a negative dimension counts as empty") {
  const sl::parameter_descriptor bad{"bad", sl::dtype::f16, {4, -2}};
  CHECK(bad.elements() == 0);
  CHECK(bad.bytes() == 0);
}

TEST_CASE("parameter: a large shape does not overflow 32 bits") {
  const sl::parameter_descriptor embed{"embed", sl::dtype::f32, {152064, 8192}};
  CHECK(embed.bytes() == std::uint64_t{152064} * 8192 * 4);
}

TEST_CASE("parameter: descriptors compare by name, dtype and shape") {
  const sl::parameter_descriptor a{"w", sl::dtype::bf16, {4, 4}};
  CHECK(a == sl::parameter_descriptor{"w", sl::dtype::bf16, {4, 4}});
  CHECK_FALSE(a == sl::parameter_descriptor{"v", sl::dtype::bf16, {4, 4}});
  CHECK_FALSE(a == sl::parameter_descriptor{"w", sl::dtype::f16, {4, 4}});
  CHECK_FALSE(a == sl::parameter_descriptor{"w", sl::dtype::bf16, {4, 2, 2}});
}

TEST_CASE("parameter: describe names the tensor, dtype and shape") {
  const std::vector<std::int64_t> none;
  CHECK(sl::shape_string(none) == "[]");
  CHECK(sl::describe({"w", sl::dtype::f8_e4m3, {8, 16}}) == "'w' f8_e4m3 [8, 16]");
}
