// The commit copy of a weights_receiver's shadow into engine tensors in GPU memory
// (receiver_options::commit_copy, cuda::device_commit_copy): the receiver side of the pinned
// replica path of GPU memory over verbs (shardline/cuda/gpudirect.hpp). The loopback transport
// stands in for verbs here: it writes the host shadow as RDMA would; what is under test is the
// commit's copy host -> device and the receiver's handling of it, not the transport.
// The refusals and a failing copier need no GPU; the copy itself is in test suite "gpu".
#include <shardline/cuda/commit_copy.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/transport/loopback.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include "../support/checks.hpp"
#include "../support/shard_pattern.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace cuda = shardline::cuda;
namespace sl = shardline;

namespace {

using receiver_type = sl::weights_receiver<sl::loopback_transport::receiver>;

const std::string w_qkv = "layers.0.self_attn.qkv_proj.weight";
const std::string w_o = "layers.0.self_attn.o_proj.weight";
const std::string w_norm = "layers.0.input_layernorm.weight";

// One sender, three parameters of odd sizes (so no copy is a multiple of anything).
sl::transfer_plan one_sender_plan() {
  sl::plan_options options;
  options.senders = 1;
  const std::vector<sl::parameter_descriptor> layer{{w_qkv, sl::dtype::bf16, {96, 64}},
                                                    {w_o, sl::dtype::bf16, {64, 33}},
                                                    {w_norm, sl::dtype::f32, {77}}};
  return sl::transfer_plan::build(layer, sl::shard_map::standard(), options);
}

// The engine's tensors: in device memory (one cudaMalloc each) or, without a GPU, host memory.
struct engine_tensors {
  std::vector<sl::engine_tensor> list;
  std::vector<cuda::device_buffer> device;
  std::vector<std::vector<std::byte>> host;

  static engine_tensors on_device(const sl::transfer_plan& plan, int ordinal) {
    engine_tensors e;
    for (const auto& p : plan.receiver_parameters(0)) {
      auto& b = e.device.emplace_back(p.bytes(), ordinal);
      REQUIRE(cudaMemset(b.data(), 0xee, b.size()) == cudaSuccess);
      e.list.push_back({p.name, p.type, p.shape, b.bytes(), sl::memory_location::cuda(ordinal)});
    }
    return e;
  }
  static engine_tensors in_host(const sl::transfer_plan& plan, sl::memory_location where) {
    engine_tensors e;
    e.host.reserve(plan.receiver_parameters(0).size());
    for (const auto& p : plan.receiver_parameters(0)) {
      auto& b = e.host.emplace_back(p.bytes(), std::byte{0xee});
      e.list.push_back({p.name, p.type, p.shape, b, where});
    }
    return e;
  }
};

// Receiver 0 of one_sender_plan() adopting `tensors` behind a shadow, and sender 0 writing it
// through loopback, by hand.
struct fixture {
  asio::io_context io;
  sl::transfer_plan plan = one_sender_plan();
  sl::loopback_transport transport{io.get_executor()};
  sl::loopback_transport::receiver endpoint{io.get_executor()};
  receiver_type weights;
  sl::loopback_transport::connection link;

  fixture(std::vector<sl::engine_tensor> tensors, sl::receiver_options options)
      : weights(endpoint, plan, 0, std::move(tensors), std::move(options)),
        link(transport.connect(endpoint, {0, plan.fingerprint()})) {}

  void notify(sl::notice_kind kind, std::uint32_t version) {
    std::optional<std::error_code> ack;
    link.async_notify(kind, version, [&ack](std::error_code ec) { ack = ec; });
    REQUIRE(sl::testing::drive(io, [&] { return ack.has_value(); }));
    REQUIRE_MESSAGE(!*ack, "notice " << sl::to_string(kind) << ": " << ack->message());
  }

  void write(std::uint32_t version) {
    std::vector<std::vector<std::byte>> images;
    images.reserve(plan.parameter_count());
    std::vector<sl::write_request> requests;
    for (std::size_t i = 0; i < plan.parameter_count(); ++i) {
      const sl::planned_parameter& p = plan.parameter(i);
      auto& image = images.emplace_back(p.staging_bytes);
      for (const auto& s : p.parameter.shards)
        for (std::size_t b = 0; b < s.tensor.bytes(); ++b)
          image[s.offset + b] = sl::testing::pattern(s.tensor.name, version, b);
      const auto local = transport.register_memory(image).region();
      const sl::remote_region* region = link.remote_regions().find(p.slice.name);
      REQUIRE(region != nullptr);
      for (const auto& w : p.writes)
        requests.push_back(sl::make_write(local, std::span(image).subspan(w.staging_offset, w.bytes), *region,
                                          w.destination_offset));
    }
    std::optional<std::error_code> done;
    link.async_write(requests, [&done](std::error_code ec) { done = ec; });
    REQUIRE(sl::testing::drive(io, [&] { return done.has_value(); }));
    REQUIRE_MESSAGE(!*done, "write: " << done->message());
  }

  // Begin, write every byte, commit: the waiter's outcome.
  std::pair<std::error_code, std::uint32_t> push(std::uint32_t version) {
    std::optional<std::pair<std::error_code, std::uint32_t>> out;
    weights.async_wait_commit([&out](std::error_code ec, std::uint32_t v) { out.emplace(ec, v); });
    notify(sl::notice_kind::begin, version);
    write(version);
    notify(sl::notice_kind::commit, version);
    REQUIRE(sl::testing::drive(io, [&] { return out.has_value(); }));
    return *out;
  }

  std::vector<std::byte> expected(const sl::parameter_descriptor& p, std::uint32_t version) const {
    return sl::testing::expected_bytes(plan, 0, p, version);
  }
};

// Device bytes, read back.
std::vector<std::byte> read_device(std::span<const std::byte> device) {
  std::vector<std::byte> host(device.size());
  REQUIRE(cudaMemcpy(host.data(), device.data(), device.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
  return host;
}

bool all_bytes(std::span<const std::byte> bytes, std::byte value) {
  return std::all_of(bytes.begin(), bytes.end(), [value](std::byte b) { return b == value; });
}

}  // namespace

TEST_CASE("commit copy: without receiver_options::commit_copy a cuda_device tensor behind a shadow is refused, naming it") {
  const auto plan = one_sender_plan();
  asio::io_context io;
  sl::loopback_transport::receiver endpoint{io.get_executor()};
  auto e = engine_tensors::in_host(plan, sl::memory_location::host());
  e.list[0].location = sl::memory_location::cuda(0);
  sl::testing::check_throws([&] { receiver_type weights(endpoint, plan, 0, e.list, {.shadow = true}); },
                            sl::errc::unsupported_memory,
                            {"tensor '" + e.list[0].name + "'", "cuda_device:0", "receiver_options::commit_copy",
                             "cuda::device_commit_copy()"});
  CHECK(endpoint.regions().empty());
}

TEST_CASE("commit copy: a copier that writes only host memory refuses a cuda_device tensor, saying what it writes") {
  const auto plan = one_sender_plan();
  asio::io_context io;
  sl::loopback_transport::receiver endpoint{io.get_executor()};
  auto e = engine_tensors::in_host(plan, sl::memory_location::host());
  e.list[1].location = sl::memory_location::cuda(1);
  sl::receiver_options options{.shadow = true};
  options.commit_copy = {{sl::memory_kind::host}, [](std::span<const sl::shadow_copy>) {}};
  sl::testing::check_throws([&] { receiver_type weights(endpoint, plan, 0, e.list, options); },
                            sl::errc::unsupported_memory,
                            {"tensor '" + e.list[1].name + "'", "cuda_device:1", "commit_copy writes {host}"});
  CHECK(endpoint.regions().empty());
}

TEST_CASE("commit copy: device_commit_copy writes host, host_pinned and cuda_device memory") {
  const auto copier = cuda::device_commit_copy();
  CHECK(copier.kinds == sl::memory_kinds{sl::memory_kind::host, sl::memory_kind::host_pinned,
                                         sl::memory_kind::cuda_device});
  CHECK(static_cast<bool>(copier.copy));
}

TEST_CASE("commit copy: a copier that fails fails the commit with its code; live memory is dirty, the reason says why") {
  // The receiver's side of a failed copy, with host tensors and a copier that fails once: no GPU needed.
  const auto plan = one_sender_plan();
  auto e = engine_tensors::in_host(plan, sl::memory_location::host());
  int calls = 0;
  bool fail = true;
  std::size_t copies_seen = 0;
  sl::receiver_options options{.shadow = true};
  options.commit_copy = {{sl::memory_kind::host},
                         [&](std::span<const sl::shadow_copy> copies) {
                           ++calls;
                           copies_seen = copies.size();
                           if (fail)
                             throw sl::error(cuda::make_error_code(cudaErrorLaunchFailure),
                                             "commit copy: cudaMemcpyAsync of 12288 shadow bytes");
                           for (const auto& c : copies) std::memcpy(c.to.data(), c.from.data(), c.to.size());
                         }};
  fixture f(e.list, options);
  const auto [ec, version] = f.push(3);
  CHECK(ec == cuda::make_error_code(cudaErrorLaunchFailure));
  CHECK(version == 3);
  CHECK(calls == 1);
  CHECK(copies_seen == 3);
  CHECK(!f.weights.committed_version());
  CHECK(f.weights.state().dirty);
  CHECK(f.weights.state().target == 3);
  sl::testing::check_text(f.weights.state().reason, cudaGetErrorString(cudaErrorLaunchFailure),
                          {"copying the shadow of version 3 into live memory failed",
                           "commit copy: cudaMemcpyAsync of 12288 shadow bytes"});
  // The next version copies, commits, and leaves live memory clean.
  fail = false;
  const auto [ec4, version4] = f.push(4);
  CHECK(!ec4);
  CHECK(version4 == 4);
  CHECK(f.weights.committed_version() == 4u);
  CHECK(!f.weights.state().dirty);
  for (const auto& p : f.weights.parameters()) {
    CAPTURE(p.name);
    const auto live = f.weights.parameter(p.name);
    const auto want = f.expected(p, 4);
    CHECK(std::equal(live.begin(), live.end(), want.begin(), want.end()));
  }
}

TEST_CASE("commit copy: engine tensors in GPU memory get every committed byte, only at commit" * doctest::test_suite("gpu")) {
  const auto plan = one_sender_plan();
  auto e = engine_tensors::on_device(plan, 0);
  sl::receiver_options options{.shadow = true, .commit_copy = cuda::device_commit_copy()};
  fixture f(e.list, options);
  // The device tensors are never exposed: senders write the host shadow.
  for (const auto& r : f.endpoint.regions().regions()) CHECK(r.location == sl::memory_location::host());
  f.notify(sl::notice_kind::begin, 1);
  f.write(1);
  for (const auto& t : e.device) CHECK(all_bytes(read_device(t.bytes()), std::byte{0xee}));  // not yet
  std::optional<std::pair<std::error_code, std::uint32_t>> out;
  f.weights.async_wait_commit([&out](std::error_code ec, std::uint32_t v) { out.emplace(ec, v); });
  f.notify(sl::notice_kind::commit, 1);
  REQUIRE(sl::testing::drive(f.io, [&] { return out.has_value(); }));
  REQUIRE_MESSAGE(!out->first, out->first.message());
  CHECK(out->second == 1);
  for (std::size_t i = 0; i < e.list.size(); ++i) {
    const auto& p = f.weights.parameters()[i];
    CAPTURE(p.name);
    const auto got = read_device(f.weights.parameter(p.name));
    const auto want = f.expected(p, 1);
    REQUIRE(got.size() == want.size());
    CHECK(std::equal(got.begin(), got.end(), want.begin()));  // byte for byte
  }
  // The copy read page-locked memory: the first commit registered the shadow with CUDA.
  unsigned flags = 0;
  const auto shadow = f.endpoint.regions().regions().front();
  CHECK(cudaHostGetFlags(&flags, reinterpret_cast<void*>(shadow.address)) == cudaSuccess);
  (void)cudaGetLastError();
  // A second version replaces every byte.
  const auto [ec, version] = f.push(2);
  CHECK(!ec);
  CHECK(version == 2);
  for (const auto& p : f.weights.parameters()) {
    CAPTURE(p.name);
    const auto got = read_device(f.weights.parameter(p.name));
    const auto want = f.expected(p, 2);
    CHECK(std::equal(got.begin(), got.end(), want.begin(), want.end()));
  }
}

TEST_CASE("commit copy: a failed device copy fails the commit naming the call and the device" * doctest::test_suite("gpu")) {
  // A tensor said to be on a device this process does not see: the stream cannot be made.
  const auto plan = one_sender_plan();
  auto e = engine_tensors::on_device(plan, 0);
  e.list[2].location = sl::memory_location::cuda(cuda::device_count() + 7);
  sl::receiver_options options{.shadow = true, .commit_copy = cuda::device_commit_copy()};
  fixture f(e.list, options);
  const auto [ec, version] = f.push(1);
  CHECK(ec.category() == cuda::error_category());
  CHECK(version == 1);
  CHECK(f.weights.state().dirty);
  CHECK(!f.weights.committed_version());
  sl::testing::check_text(f.weights.state().reason, ec.message(),
                          {"copying the shadow of version 1 into live memory failed",
                           "cudaStreamCreate on device " + std::to_string(cuda::device_count() + 7)});
}
