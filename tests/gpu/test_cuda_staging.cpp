// Staging policies in pinned host memory and in device memory. The concept checks and bad
// arguments need no GPU; the cases of test suite "gpu" allocate, and run a pipeline.
#include <shardline/cuda/staging.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/transport/loopback.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/io_context.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "../support/shard_pattern.hpp"
#include "gpu_support.hpp"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <vector>

namespace cuda = shardline::cuda;
namespace sl = shardline;
using namespace std::chrono_literals;

static_assert(sl::staging_policy<cuda::pinned_staging>);
static_assert(sl::staging_policy<cuda::device_staging>);
static_assert(std::is_same_v<sl::pipeline_config<2, sl::no_tracer, 64, (1u << 30), cuda::pinned_staging>::staging_type,
                             cuda::pinned_staging>);

namespace {

std::size_t free_device_memory(int device) {
  int previous = 0;
  REQUIRE(cudaGetDevice(&previous) == cudaSuccess);
  REQUIRE(cudaSetDevice(device) == cudaSuccess);
  std::size_t free = 0, total = 0;
  REQUIRE(cudaMemGetInfo(&free, &total) == cudaSuccess);
  REQUIRE(cudaSetDevice(previous) == cudaSuccess);
  return free;
}

bool aligned(const std::byte* p, std::size_t alignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

std::vector<sl::parameter_descriptor> tiny_model() {
  std::vector<sl::parameter_descriptor> t;
  t.push_back({"model.embed_tokens.weight", sl::dtype::bf16, {64, 32}});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "self_attn.q_proj.weight", sl::dtype::bf16, {32, 32}});
    t.push_back({p + "self_attn.k_proj.weight", sl::dtype::bf16, {16, 32}});
    t.push_back({p + "self_attn.v_proj.weight", sl::dtype::bf16, {16, 32}});
    t.push_back({p + "mlp.gate_proj.weight", sl::dtype::bf16, {64, 32}});
    t.push_back({p + "mlp.up_proj.weight", sl::dtype::bf16, {64, 32}});
  }
  return t;
}

}  // namespace

TEST_CASE("cuda staging: the policies default to device 0 and refuse an alignment that is no power of two") {
  CHECK(cuda::pinned_staging{}.device == 0);
  CHECK(cuda::pinned_staging{}.flags == cudaHostAllocPortable);
  CHECK(cuda::device_staging{3}.device == 3);
  CHECK_THROWS_WITH_AS(cuda::pinned_staging{}.allocate(4096, 3),
                       "pinned_staging: alignment 3 is not a power of two: invalid argument", sl::error);
  CHECK_THROWS_WITH_AS(cuda::device_staging{}.allocate(4096, 0),
                       "device_staging: alignment 0 is not a power of two: invalid argument", sl::error);
  try {
    (void)cuda::device_staging{1}.allocate(4096, 48);
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::invalid_argument);
  }
}

TEST_CASE("cuda staging: without a usable GPU the policies fail with the CUDA call and its text") {
  if (cuda::device_count() > 0) return;
  CHECK_THROWS_WITH_AS(cuda::pinned_staging{}.allocate(4096, 4096),
                       doctest::Contains("cudaHostAlloc of 4096 bytes on device 0: "), sl::error);
  CHECK_THROWS_WITH_AS(cuda::device_staging{}.allocate(4096, 4096),
                       doctest::Contains("cudaMalloc of 4096 bytes on device 0: "), sl::error);
}

TEST_CASE("cuda staging: pinned staging is aligned, host_pinned, usable and freed" * doctest::test_suite("gpu")) {
  const std::size_t bytes = (std::size_t(64) << 20) + 3;
  for (std::size_t alignment : {std::size_t(1), std::size_t(4096), std::size_t(1) << 16, std::size_t(1) << 21}) {
    INFO("alignment " << alignment);
    std::byte* address = nullptr;
    {
      auto block = cuda::pinned_staging{}.allocate(bytes, alignment);
      address = block.bytes().data();
      CHECK(block.bytes().size() == bytes);
      CHECK(aligned(address, alignment));
      CHECK(block.location() == sl::memory_location::host_pinned());
      cudaPointerAttributes a{};
      REQUIRE(cudaPointerGetAttributes(&a, address) == cudaSuccess);
      CHECK(a.type == cudaMemoryTypeHost);
      std::memset(address, 0x7E, bytes);  // every byte is the host's to write
      auto moved = std::move(block);
      CHECK(block.bytes().empty());
      CHECK(moved.bytes().data() == address);
    }
    cudaPointerAttributes after{};
    REQUIRE(cudaPointerGetAttributes(&after, address) == cudaSuccess);
    CHECK(after.type == cudaMemoryTypeUnregistered);
  }
}

TEST_CASE("cuda staging: device staging is aligned, on its device, and freed" * doctest::test_suite("gpu")) {
  const std::size_t bytes = std::size_t(1) << 30;
  for (int d = 0; d < cuda::device_count(); ++d) {
    INFO("device " << d);
    const std::size_t before = free_device_memory(d);
    {
      auto block = cuda::device_staging{d}.allocate(bytes, std::size_t(1) << 21);
      CHECK(block.bytes().size() == bytes);
      CHECK(aligned(block.bytes().data(), std::size_t(1) << 21));
      CHECK(block.location() == sl::memory_location::cuda(d));
      cudaPointerAttributes a{};
      REQUIRE(cudaPointerGetAttributes(&a, block.bytes().data()) == cudaSuccess);
      CHECK(a.type == cudaMemoryTypeDevice);
      CHECK(a.device == d);
      // cudaMemset works on the current device's memory: make it block's device (d > 0 on a
      // machine with several GPUs).
      REQUIRE(cudaSetDevice(d) == cudaSuccess);
      CHECK(cudaMemset(block.bytes().data(), 0, bytes) == cudaSuccess);
      REQUIRE(cudaSetDevice(0) == cudaSuccess);
      CHECK(free_device_memory(d) + bytes <= before);
    }
    CHECK(free_device_memory(d) + (64u << 20) >= before);
  }
}

TEST_CASE("cuda staging: a pipeline staging in pinned memory lands every byte over loopback" *
          doctest::test_suite("gpu")) {
  using config = sl::pipeline_config<2, sl::no_tracer, 64, (std::uint64_t(1) << 30), cuda::pinned_staging>;
  using pipeline_type = sl::update_pipeline<sl::loopback_transport, config>;
  sl::plan_options options;
  options.bucket_bytes = 4096;
  const auto plan = sl::transfer_plan::build(tiny_model(), sl::shard_map::standard(), options);
  asio::io_context io;
  sl::loopback_transport transport(io.get_executor());
  sl::loopback_transport::receiver endpoint(io.get_executor());
  sl::weights_receiver<sl::loopback_transport::receiver> weights(endpoint, plan, 0);
  auto connection = transport.connect(endpoint, {0, plan.fingerprint()});
  pipeline_type pipeline(transport, plan, {&connection});
  CHECK(pipeline.staging_location() == sl::memory_location::host_pinned());
  auto loads_pinned = std::make_shared<bool>(true);
  auto loader = [loads_pinned](const sl::shard_load& load) {
    if (load.location != sl::memory_location::host_pinned()) *loads_pinned = false;
    sl::testing::fill(load);
  };
  auto f = pipeline.async_update(5, loader, asio::use_future);
  gpu_test::run_until(io, [&] { return f.wait_for(0s) == std::future_status::ready; });
  const auto report = f.get();
  CHECK(report.version == 5);
  CHECK(*loads_pinned);
  for (const auto& p : weights.parameters()) {
    INFO("parameter " << p.name);
    const auto got = weights.parameter(p.name);
    const auto want = sl::testing::expected_bytes(plan, 0, p, 5);
    REQUIRE(got.size() == want.size());
    CHECK(std::memcmp(got.data(), want.data(), want.size()) == 0);
  }
}

TEST_CASE("cuda staging: a transport that cannot read device memory refuses device staging, naming it" *
          doctest::test_suite("gpu")) {
  using config = sl::pipeline_config<2, sl::no_tracer, 64, (std::uint64_t(1) << 30), cuda::device_staging>;
  using pipeline_type = sl::update_pipeline<sl::loopback_transport, config>;
  const auto plan = sl::transfer_plan::build(tiny_model(), sl::shard_map::standard(), {});
  asio::io_context io;
  sl::loopback_transport transport(io.get_executor());
  sl::loopback_transport::receiver endpoint(io.get_executor());
  sl::weights_receiver<sl::loopback_transport::receiver> weights(endpoint, plan, 0);
  auto connection = transport.connect(endpoint, {0, plan.fingerprint()});
  try {
    pipeline_type pipeline(transport, plan, {&connection}, {}, cuda::device_staging{0});
    FAIL("the loopback transport cannot read device memory");
  } catch (const sl::error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(e.code() == sl::errc::unsupported_memory);
    CHECK(what.find("cuda_device:0") != std::string::npos);
  }
}
