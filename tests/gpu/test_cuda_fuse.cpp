// Fuse copies: descriptor checks and the CPU gather (no GPU), then the GPU kernels against the
// CPU reference on random data, byte for byte (test suite "gpu").
#include <shardline/cuda/fuse.hpp>

#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/fp8.hpp>
#include <shardline/cuda/stream.hpp>
#include <shardline/plan/convert.hpp>

#include <doctest/doctest.h>

#include "gpu_kernels.hpp"

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace cuda = shardline::cuda;
namespace sl = shardline;

namespace {

struct outcome {
  std::string what;
  std::error_code code;
};

outcome check(std::vector<cuda::fuse_copy> copies) {
  try {
    cuda::check_fuse_copies(copies);
  } catch (const sl::error& e) {
    return {e.what(), e.code()};
  }
  return {"(nothing thrown)", {}};
}

// Host tensors for the checks: their memory is never touched by check_fuse_copies.
alignas(16) std::uint16_t q_mem[64 * 32], k_mem[16 * 32], out_mem[256 * 32];
alignas(16) float scale_mem[64];

cuda::source_matrix q() { return {"q_proj", q_mem, sl::dtype::bf16, 64, 32}; }
cuda::source_matrix k() { return {"k_proj", k_mem, sl::dtype::bf16, 16, 32}; }
cuda::destination_matrix qkv() { return {"qkv_proj", out_mem, sl::dtype::bf16, 96, 32}; }
cuda::destination_matrix qkv_fp8(std::int64_t rows = 256) {
  return {"qkv_proj", out_mem, sl::dtype::f8_e4m3, rows, 32, 0, scale_mem, {128, 32}};
}

}  // namespace

TEST_CASE("check_fuse_copies: well-formed copies pass, including a TP slice and an fp8 destination") {
  CHECK(check({cuda::whole(q(), qkv()), cuda::whole(k(), qkv(), 64)}).what == "(nothing thrown)");
  CHECK(check({{q(), 32, 0, 32, 32, qkv(), 0, 0}}).what == "(nothing thrown)");
  cuda::source_matrix big{"gate_proj", out_mem, sl::dtype::bf16, 256, 32};
  CHECK(check({{big, 0, 0, 128, 32, qkv_fp8(), 0, 0}, {big, 128, 0, 100, 32, qkv_fp8(228), 128, 0}}).what ==
        "(nothing thrown)");
}

TEST_CASE("check_fuse_copies: a slice outside its source or destination is refused, naming the copy") {
  auto r = check({cuda::whole(q(), qkv()), {k(), 8, 0, 16, 32, qkv(), 64, 0}});
  CHECK(r.what == "fuse copy 1 ('k_proj' -> 'qkv_proj'): the slice rows [8, 24) x cols [0, 32) lies outside "
                  "the source's [16, 32]: invalid argument");
  CHECK(r.code == sl::errc::invalid_argument);
  CHECK(check({{k(), 0, 4, 16, 32, qkv(), 64, 0}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice rows [0, 16) x cols [4, 36) lies outside the source's "
        "[16, 32]: invalid argument");
  CHECK(check({{k(), -1, 0, 16, 32, qkv(), 64, 0}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice rows [-1, 15) x cols [0, 32) lies outside the source's "
        "[16, 32]: invalid argument");
  CHECK(check({cuda::whole(k(), qkv(), 88)}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice lands at rows [88, 104) x cols [0, 32), outside the "
        "destination's [96, 32]: invalid argument");
  CHECK(check({{k(), 0, 0, 16, 32, qkv(), 0, 1}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice lands at rows [0, 16) x cols [1, 33), outside the "
        "destination's [96, 32]: invalid argument");
}

TEST_CASE("check_fuse_copies: mismatched dtypes are a layout mismatch; bf16 -> f8_e4m3 is the one conversion") {
  cuda::source_matrix f16{"k_proj", k_mem, sl::dtype::f16, 16, 32};
  auto r = check({cuda::whole(f16, qkv())});
  CHECK(r.what == "fuse copy 0 ('k_proj' -> 'qkv_proj'): source dtype f16 and destination dtype bf16 differ "
                  "(the one conversion is bf16 -> f8_e4m3): dtype or shape differ");
  CHECK(r.code == sl::errc::layout_mismatch);
  CHECK(check({cuda::whole(f16, qkv_fp8())}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): source dtype f16 and destination dtype f8_e4m3 differ "
        "(the one conversion is bf16 -> f8_e4m3): dtype or shape differ");
  cuda::source_matrix fp8{"k_proj", k_mem, sl::dtype::f8_e4m3, 16, 32};
  CHECK(check({cuda::whole(fp8, qkv())}).code == sl::errc::layout_mismatch);
  cuda::source_matrix unknown{"k_proj", k_mem, static_cast<sl::dtype>(42), 16, 32};
  CHECK(check({cuda::whole(unknown, qkv())}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): source 'k_proj' has an unknown dtype (value 42): invalid argument");
}

TEST_CASE("check_fuse_copies: empty slices and zero-sized or misaligned scale blocks are refused") {
  CHECK(check({{k(), 0, 0, 0, 32, qkv(), 0, 0}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice is empty or negative: 0 x 32: invalid argument");
  CHECK(check({{k(), 0, 0, 16, -2, qkv(), 0, 0}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice is empty or negative: 16 x -2: invalid argument");
  auto zero_block = qkv_fp8();
  zero_block.block = {0, 32};
  CHECK(check({cuda::whole(k(), zero_block)}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the destination's scale block is 0 x 32, both dimensions must be "
        "at least 1: invalid argument");
  zero_block.block = {128, 0};
  CHECK(check({cuda::whole(k(), zero_block)}).code == sl::errc::invalid_argument);
  // k's 16 rows at row 64: its block (rows 0-127) would also hold q's rows.
  CHECK(check({cuda::whole(k(), qkv_fp8(), 64)}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice lands at row 64, not a multiple of the 128-row scale "
        "block (a block would take elements of two copies): invalid argument");
  CHECK(check({cuda::whole(k(), qkv_fp8(), 128)}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice ends at row 144, inside a 128-row scale block that "
        "goes on (the destination has 256 rows): invalid argument");
  CHECK(check({cuda::whole(k(), qkv_fp8(144), 128)}).what == "(nothing thrown)");  // ends at the edge
  CHECK(check({{k(), 0, 0, 16, 16, qkv_fp8(16), 0, 16}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice lands at col 16, not a multiple of the 32-col scale "
        "block (a block would take elements of two copies): invalid argument");
  CHECK(check({{k(), 0, 0, 16, 16, qkv_fp8(16), 0, 0}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the slice ends at col 16, inside a 32-col scale block that goes "
        "on (the destination has 32 cols): invalid argument");
  auto no_scales = qkv_fp8(16);
  no_scales.scales = nullptr;
  CHECK(check({cuda::whole(k(), no_scales)}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): the destination is f8_e4m3 and has no scales (null): invalid "
        "argument");
}

TEST_CASE("check_fuse_copies: null or misaligned data, negative dims and short row strides are refused") {
  cuda::source_matrix null{"k_proj", nullptr, sl::dtype::bf16, 16, 32};
  CHECK(check({cuda::whole(null, qkv())}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): source 'k_proj' has no data (null): invalid argument");
  cuda::source_matrix odd{"k_proj", reinterpret_cast<std::byte*>(k_mem) + 1, sl::dtype::bf16, 16, 32};
  CHECK(check({cuda::whole(odd, qkv())}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): source 'k_proj': data is not aligned to its 2-byte bf16 elements: "
        "invalid argument");
  auto odd_out = qkv();
  odd_out.data = reinterpret_cast<std::byte*>(out_mem) + 3;
  CHECK(check({cuda::whole(k(), odd_out)}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): destination 'qkv_proj': data is not aligned to its 2-byte bf16 "
        "elements: invalid argument");
  cuda::source_matrix negative{"k_proj", k_mem, sl::dtype::bf16, -16, 32};
  CHECK(check({{negative, 0, 0, 1, 32, qkv(), 0, 0}}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): source 'k_proj' has a negative dimension: [-16, 32]: invalid argument");
  cuda::source_matrix short_stride{"k_proj", k_mem, sl::dtype::bf16, 16, 32, 16};
  CHECK(check({cuda::whole(short_stride, qkv())}).what ==
        "fuse copy 0 ('k_proj' -> 'qkv_proj'): source 'k_proj': row_stride 16 is less than its 32 columns: invalid "
        "argument");
}

TEST_CASE("stack_row_slices: rank r's q/k/v rows stacked into qkv; bad splits refused, naming the member") {
  const cuda::source_matrix members[] = {q(), k()};
  const auto copies = cuda::stack_row_slices(members, 4, 3, {"qkv_proj", out_mem, sl::dtype::bf16, 20, 32});
  REQUIRE(copies.size() == 2);
  CHECK(copies[0].source_row == 48);
  CHECK(copies[0].rows == 16);
  CHECK(copies[0].destination_row == 0);
  CHECK(copies[1].source_row == 12);
  CHECK(copies[1].rows == 4);
  CHECK(copies[1].destination_row == 16);
  const auto what = [&](std::size_t tp, std::size_t rank, cuda::destination_matrix d) -> std::string {
    try {
      (void)cuda::stack_row_slices(members, tp, rank, d);
    } catch (const sl::error& e) {
      return e.what();
    }
    return "(nothing thrown)";
  };
  CHECK(what(3, 0, qkv()) == "stack_row_slices into 'qkv_proj': member 'q_proj' [64, 32]: 64 rows do not divide "
                             "by tp 3: invalid argument");
  CHECK(what(4, 4, qkv()) == "stack_row_slices into 'qkv_proj': rank 4 does not exist (tp is 4): invalid argument");
  CHECK(what(0, 0, qkv()) == "stack_row_slices into 'qkv_proj': tp is 0, it must be at least 1: invalid argument");
  CHECK(what(4, 0, qkv()) == "stack_row_slices into 'qkv_proj': the slices of rank 0 have 20 rows, the "
                             "destination 96: invalid argument");
  CHECK(what(4, 0, {"qkv_proj", out_mem, sl::dtype::bf16, 20, 16}) ==
        "stack_row_slices into 'qkv_proj': member 'q_proj' [64, 32] has 32 columns, the destination 16: source "
        "and destination sizes differ");
}

TEST_CASE("fuse_on_host: a TP rank's qkv equals a hand-written gather; a column slice lands in place") {
  // q [8, 4], k [4, 4], v [4, 4], tp 2, rank 1: qkv = q rows 4-7, k rows 2-3, v rows 2-3.
  std::vector<std::int32_t> qm(32), km(16), vm(16), out(16 * 4, -1);
  for (int i = 0; i < 32; ++i) qm[i] = 1000 + i;
  for (int i = 0; i < 16; ++i) km[i] = 2000 + i, vm[i] = 3000 + i;
  const cuda::source_matrix members[] = {{"q", qm.data(), sl::dtype::i32, 8, 4},
                                         {"k", km.data(), sl::dtype::i32, 4, 4},
                                         {"v", vm.data(), sl::dtype::i32, 4, 4}};
  cuda::fuse_on_host(cuda::stack_row_slices(members, 2, 1, {"qkv", out.data(), sl::dtype::i32, 8, 4}));
  std::vector<std::int32_t> expected;
  for (int r = 4; r < 8; ++r)
    for (int c = 0; c < 4; ++c) expected.push_back(qm[r * 4 + c]);
  for (int r = 2; r < 4; ++r)
    for (int c = 0; c < 4; ++c) expected.push_back(km[r * 4 + c]);
  for (int r = 2; r < 4; ++r)
    for (int c = 0; c < 4; ++c) expected.push_back(vm[r * 4 + c]);
  CHECK(std::vector<std::int32_t>(out.begin(), out.begin() + 32) == expected);
  CHECK(out[32] == -1);  // nothing past the destination's rows

  // o_proj [2, 6] split by columns, rank 1 of 3: columns 2-3 of each row, into a [2, 2] destination
  // whose rows are 4 apart (row_stride).
  std::vector<std::int32_t> o = {0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15}, slice(8, -1);
  const cuda::fuse_copy c{{"o_proj", o.data(), sl::dtype::i32, 2, 6}, 0, 2, 2, 2,
                          {"o_proj.tp1", slice.data(), sl::dtype::i32, 2, 2, 4}, 0, 0};
  cuda::fuse_on_host(std::vector{c});
  CHECK(slice == std::vector<std::int32_t>{2, 3, -1, -1, 12, 13, -1, -1});
}

TEST_CASE("fuse_on_host and enqueue_fuse refuse a malformed batch before touching memory or CUDA") {
  std::vector<std::uint16_t> out(96 * 32, 7);
  cuda::destination_matrix d{"qkv_proj", out.data(), sl::dtype::bf16, 96, 32};
  const std::vector copies{cuda::whole(q(), d), cuda::whole(k(), d, 90)};
  try {
    cuda::fuse_on_host(copies);
    FAIL("nothing thrown");
  } catch (const sl::error& e) {
    CHECK(std::string(e.what()) == "fuse copy 1 ('k_proj' -> 'qkv_proj'): the slice lands at rows [90, 106) x cols "
                                   "[0, 32), outside the destination's [96, 32]: invalid argument");
  }
  CHECK(out[0] == 7);  // copy 0 was well formed, but nothing ran
  // The GPU path checks the same way, before any CUDA call: this runs without a GPU.
  try {
    gpu_test::fuse(copies.data(), copies.size(), nullptr);
    FAIL("nothing thrown");
  } catch (const sl::error& e) {
    CHECK(std::string(e.what()) == "fuse copy 1 ('k_proj' -> 'qkv_proj'): the slice lands at rows [90, 106) x cols "
                                   "[0, 32), outside the destination's [96, 32]: invalid argument");
    CHECK(e.code() == sl::errc::invalid_argument);
  }
}

namespace {

std::vector<std::uint8_t> random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> v(n);
  for (auto& b : v) b = static_cast<std::uint8_t>(rng() >> 24);
  return v;
}

// bf16 weights ~ N(0, 0.02), a few outliers; never zero.
std::vector<std::uint16_t> random_weights(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> w(0.0f, 0.02f);
  std::uniform_int_distribution<int> pick(0, 999);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) {
    float f = w(rng);
    if (pick(rng) == 0) f *= 300.0f;
    if (f == 0.0f) f = 1e-3f;
    x = sl::to_bf16(f);
  }
  return v;
}

// A tensor held twice: on the host (for the CPU reference) and on the device.
struct twin {
  std::vector<std::uint8_t> host;
  cuda::device_buffer device;

  explicit twin(std::vector<std::uint8_t> bytes) : host(std::move(bytes)), device(host.size(), 0) {
    REQUIRE(cudaMemcpy(device.data(), host.data(), host.size(), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<std::uint8_t> fetch() const {
    std::vector<std::uint8_t> v(host.size());
    REQUIRE(cudaMemcpy(v.data(), device.data(), v.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
    return v;
  }
  void* at(bool on_device) { return on_device ? static_cast<void*>(device.data()) : host.data(); }
};

template <class T>
std::vector<std::uint8_t> as_bytes(const std::vector<T>& v) {
  std::vector<std::uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Runs the copies `make(on_device)` builds once on the host, once on the GPU; `outputs` must
// then agree byte for byte (they start equal, filled with a pattern the copies overwrite).
template <class Make>
void check_against_host(Make make, std::vector<twin*> outputs) {
  cuda::fuse_on_host(make(false));
  cuda::stream s(0);
  const auto copies = make(true);
  gpu_test::fuse(copies.data(), copies.size(), s.native_handle());
  s.synchronize();
  for (std::size_t o = 0; o < outputs.size(); ++o) {
    CAPTURE(o);
    const auto got = outputs[o]->fetch();
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      if (got[i] != outputs[o]->host[i] && ++wrong <= 5)
        FAIL_CHECK("byte " << i << ": GPU " << int(got[i]) << ", CPU " << int(outputs[o]->host[i]));
    CHECK(wrong == 0);
  }
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("fuse on the GPU: TP row slices of q/k/v into qkv and gate/up into gate_up, byte for byte") {
    constexpr std::int64_t hidden = 520, tp = 4, rank = 2;
    twin qw(as_bytes(random_weights(512 * hidden, 1))), kw(as_bytes(random_weights(128 * hidden, 2))),
        vw(as_bytes(random_weights(128 * hidden, 3))), gate(as_bytes(random_weights(1024 * hidden, 4))),
        up(as_bytes(random_weights(1024 * hidden, 5)));
    twin qkv(random_bytes((512 + 256) / tp * hidden * 2, 6)), gate_up(random_bytes(2048 / tp * hidden * 2, 7));
    check_against_host(
        [&](bool dev) {
          const cuda::source_matrix attn[] = {{"q_proj", qw.at(dev), sl::dtype::bf16, 512, hidden},
                                              {"k_proj", kw.at(dev), sl::dtype::bf16, 128, hidden},
                                              {"v_proj", vw.at(dev), sl::dtype::bf16, 128, hidden}};
          const cuda::source_matrix mlp[] = {{"gate_proj", gate.at(dev), sl::dtype::bf16, 1024, hidden},
                                             {"up_proj", up.at(dev), sl::dtype::bf16, 1024, hidden}};
          auto copies = cuda::stack_row_slices(attn, tp, rank, {"qkv_proj", qkv.at(dev), sl::dtype::bf16, 192, hidden});
          for (auto& c : cuda::stack_row_slices(mlp, tp, rank, {"gate_up_proj", gate_up.at(dev), sl::dtype::bf16, 512, hidden}))
            copies.push_back(c);
          return copies;
        },
        {&qkv, &gate_up});
  }

  TEST_CASE("fuse on the GPU: unaligned, strided and column slices, and long rows cut across") {
    // i8 with odd sizes (1-byte accesses), f32 columns 3..46 into rows 50 apart (4-byte), and
    // one row of 300000 bf16 (long enough to be cut into several tiles).
    twin a(random_bytes(37 * 13, 1)), b(as_bytes(random_weights(64 * 48 * 2, 2))), c(as_bytes(random_weights(300000, 3)));
    twin out_a(random_bytes(50 * 13, 4)), out_b(random_bytes(64 * 50 * 4, 5)), out_c(random_bytes(300016 * 2, 6));
    check_against_host(
        [&](bool dev) {
          return std::vector<cuda::fuse_copy>{
              {{"a", a.at(dev), sl::dtype::i8, 37, 13}, 0, 0, 37, 13, {"a_out", out_a.at(dev), sl::dtype::i8, 50, 13}, 5, 0},
              {{"b", b.at(dev), sl::dtype::f32, 64, 48}, 0, 3, 64, 44, {"b_out", out_b.at(dev), sl::dtype::f32, 64, 44, 50}, 0, 0},
              {{"c", c.at(dev), sl::dtype::bf16, 1, 300000}, 0, 0, 1, 300000, {"c_out", out_c.at(dev), sl::dtype::bf16, 1, 300016}, 0, 16}};
        },
        {&out_a, &out_b, &out_c});
  }

  TEST_CASE("fuse on the GPU: hundreds of copies in one call (several launches) land byte for byte") {
    // 900 copies of 2 x 64 bf16, shuffled into one destination: more than one launch holds.
    twin src(as_bytes(random_weights(900 * 2 * 64, 8))), out(random_bytes(900 * 2 * 64 * 2, 9));
    std::vector<int> order(900);
    for (int i = 0; i < 900; ++i) order[i] = (i * 7919) % 900;
    check_against_host(
        [&](bool dev) {
          std::vector<cuda::fuse_copy> copies;
          for (int i = 0; i < 900; ++i)
            copies.push_back({{"src", src.at(dev), sl::dtype::bf16, 1800, 64}, 2 * i, 0, 2, 64,
                              {"out", out.at(dev), sl::dtype::bf16, 1800, 64}, 2 * order[i], 0});
          return copies;
        },
        {&out});
  }

  TEST_CASE("fuse and quantize on the GPU: TP slices of q/k/v into an fp8 qkv with scales, byte for byte") {
    // Rank 1 of 2: q 1024 -> 512 rows, k and v 256 -> 128 rows each; 640 columns, 128 x 128
    // blocks: scales [6, 5]. Then the same with 100-column blocks (the element path).
    constexpr std::int64_t hidden = 640;
    twin qw(as_bytes(random_weights(1024 * hidden, 11))), kw(as_bytes(random_weights(256 * hidden, 12))),
        vw(as_bytes(random_weights(256 * hidden, 13)));
    for (cuda::fp8_block block : {cuda::fp8_block{}, cuda::fp8_block{128, 100}}) {
      CAPTURE(block.cols);
      const auto scale_shape = cuda::fp8_scale_shape("qkv", {768, hidden}, block);
      twin qkv(random_bytes(768 * hidden, 14)), scales(random_bytes(scale_shape[0] * scale_shape[1] * 4, 15));
      check_against_host(
          [&](bool dev) {
            const cuda::source_matrix attn[] = {{"q_proj", qw.at(dev), sl::dtype::bf16, 1024, hidden},
                                                {"k_proj", kw.at(dev), sl::dtype::bf16, 256, hidden},
                                                {"v_proj", vw.at(dev), sl::dtype::bf16, 256, hidden}};
            return cuda::stack_row_slices(attn, 2, 1,
                                          {"qkv_proj", qkv.at(dev), sl::dtype::f8_e4m3, 768, hidden, 0,
                                           static_cast<float*>(scales.at(dev)), block});
          },
          {&qkv, &scales});
    }
  }
}
