#include <shardline/pipeline.hpp>

#include <shardline/transport/loopback.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/io_context.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "../support/shard_pattern.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <memory>
#include <new>
#include <string>
#include <vector>

// Every allocation of the program goes through these replacements (the replaceable global
// operator new/delete are program-wide): they forward to malloc/free and count calls, which
// only the tests below read. That is why this suite is a binary of its own
// (shardline_alloc_tests): the replacements must not sit under the rest of the suite, nor
// under a sanitizer's allocator.
namespace {

std::atomic<std::size_t> allocations{0};

void* allocate(std::size_t n) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}

void* allocate(std::size_t n, std::align_val_t a) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  const auto align = static_cast<std::size_t>(a);
  // aligned_alloc wants a size that is a multiple of the alignment.
  return std::aligned_alloc(align, (std::max<std::size_t>(n, 1) + align - 1) / align * align);
}

}  // namespace

// g++ 12 -Wall sees free() applied to what it takes for the standard operator new once these
// are inlined into their callers; they are the replacements, so the pairing is right.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

void* operator new(std::size_t n) {
  if (void* p = allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = allocate(n, a)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) {
  if (void* p = allocate(n, a)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return allocate(n, a); }
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return allocate(n, a); }

void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

#pragma GCC diagnostic pop

namespace sl = shardline;
using namespace std::chrono_literals;

namespace {

// `layers` layers of 8 source tensors (5 destination parameters) each, shapes scaled so that
// every tensor's bytes grow by scale^2: 32 layers at scale 2 hold the same bytes as 128 layers
// at scale 1, so the two models differ only in how many parameters carry those bytes. With
// tensor_parallel 2 no write coalesces into one: qkv_proj and gate_up_proj split by rows give
// each receiver one write per shard (its chunks of the shards are not adjacent in staging),
// o_proj and down_proj split by columns give one write per row, and the norms (replicated,
// 40 or 160 bytes) leave a gap before the next 256-byte aligned parameter, in staging and on
// the receiver.
std::vector<sl::parameter_descriptor> layered_model(int layers, std::int64_t scale) {
  std::vector<sl::parameter_descriptor> t;
  auto add = [&t, scale](std::string name, std::vector<std::int64_t> shape) {
    for (auto& d : shape) d *= shape.size() == 1 ? scale * scale : scale;  // bytes times scale^2
    t.push_back({std::move(name), sl::dtype::bf16, std::move(shape)});
  };
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {20});
    add(p + "self_attn.q_proj.weight", {16, 16});
    add(p + "self_attn.k_proj.weight", {8, 16});
    add(p + "self_attn.v_proj.weight", {8, 16});
    add(p + "self_attn.o_proj.weight", {16, 16});
    add(p + "mlp.gate_proj.weight", {32, 16});
    add(p + "mlp.up_proj.weight", {32, 16});
    add(p + "mlp.down_proj.weight", {16, 32});
  }
  return t;
}

constexpr int buckets = 4;

// What one model costs: the allocations of its third version, and what the plan moves.
struct measured {
  std::size_t allocations = 0;
  std::size_t parameters = 0;
  std::size_t writes = 0;
  std::size_t buckets = 0;
  std::uint64_t wire_bytes = 0;
};

// A loopback cluster (one receiver per tensor-parallel rank, weights_receiver in plan mode,
// commits awaited) for layered_model(layers, scale), cut into `buckets` buckets of the same
// number of layers, so both models run the same number of buckets with the same bytes.
measured run_versions(int layers, std::int64_t scale, std::size_t loader_threads) {
  const auto model = layered_model(layers, scale);
  sl::plan_options options;
  options.tensor_parallel = 2;
  const auto layer = sl::transfer_plan::build(layered_model(1, scale), sl::shard_map::standard(), options);
  const std::uint64_t layer_bytes = (layer.max_staging_bytes() + 255) / 256 * 256;
  options.bucket_bytes = layer_bytes * static_cast<std::uint64_t>(layers / buckets);
  const auto plan = sl::transfer_plan::build(model, sl::shard_map::standard(), options);

  asio::io_context io;
  sl::loopback_transport transport(io.get_executor());
  std::vector<std::unique_ptr<sl::loopback_transport::receiver>> endpoints;
  std::vector<std::unique_ptr<sl::weights_receiver<sl::loopback_transport::receiver>>> weights;
  std::vector<sl::loopback_transport::connection> connections;
  connections.reserve(plan.receivers());
  for (std::size_t r = 0; r < plan.receivers(); ++r) {
    endpoints.push_back(std::make_unique<sl::loopback_transport::receiver>(io.get_executor()));
    weights.push_back(std::make_unique<sl::weights_receiver<sl::loopback_transport::receiver>>(*endpoints.back(),
                                                                                              plan, r));
    connections.push_back(transport.connect(*endpoints.back(), {0, plan.fingerprint()}));
  }
  std::vector<sl::loopback_transport::connection*> links;
  for (auto& c : connections) links.push_back(&c);
  sl::pipeline_options po;
  po.loader_threads = loader_threads;
  sl::update_pipeline<sl::loopback_transport> pipeline(transport, plan, links, po);

  // Each receiver awaits every commit, as a rollout engine would.
  std::vector<std::uint32_t> committed(plan.receivers(), 0);
  struct watcher {
    sl::weights_receiver<sl::loopback_transport::receiver>* w;
    std::uint32_t* seen;
    void operator()(std::error_code ec, std::uint32_t v) const {
      if (ec && ec != sl::errc::version_abandoned) return;
      if (!ec) *seen = v;
      w->async_wait_commit(*this);
    }
  };
  for (std::size_t r = 0; r < plan.receivers(); ++r) weights[r]->async_wait_commit(watcher{weights[r].get(), &committed[r]});

  const auto update = [&](std::uint32_t version) {
    auto f = pipeline.async_update(version, sl::testing::fill, asio::use_future);
    while (f.wait_for(0s) != std::future_status::ready)
      if (io.run_one_for(20s) == 0 && f.wait_for(0s) != std::future_status::ready)
        FAIL("no progress for 20 s: the update hangs");
    return f.get();
  };
  update(1);
  update(2);
  const std::size_t before = allocations.load();
  const sl::update_report report = update(3);
  const std::size_t during = allocations.load() - before;

  // Version 3 landed whole and every receiver announced it.
  while (io.poll() > 0) {
  }
  std::uint64_t planned_bytes = 0;
  for (const auto& b : plan.buckets())
    for (const auto& p : b.parameters)
      for (const auto& w : p.writes) planned_bytes += w.bytes;
  CHECK(report.wire_bytes == planned_bytes);
  for (std::size_t r = 0; r < plan.receivers(); ++r) {
    CHECK(committed[r] == 3);
    for (const auto& p : weights[r]->parameters()) {
      const auto want = sl::testing::expected_bytes(plan, r, p, 3);
      const auto got = weights[r]->parameter(p.name);
      INFO("receiver " << r << " parameter " << p.name);
      CHECK(std::memcmp(got.data(), want.data(), want.size()) == 0);
    }
  }
  measured m;
  m.allocations = during;
  m.parameters = plan.parameter_count();
  m.buckets = plan.buckets().size();
  m.wire_bytes = planned_bytes;
  for (const auto& b : plan.buckets())
    for (const auto& p : b.parameters) m.writes += p.writes.size();
  for (auto& e : endpoints) e->close();
  io.poll();
  return m;
}

// The slack allowed between the two counts, independent of N. Both models run the same
// update: the same bytes in 4 buckets, 2 receivers, 2 notices each, the same coroutines and
// reports; only the number of parameters (and writes) differs. What may still differ is
// timing: with a loader thread, the loader wakes the io_context once per 64 KiB of a bucket
// (pipeline.hpp, start_loads: max(slot / 16, 64 KiB)), so a bucket of ~150 KB takes at most
// 3 write rounds (2 wake-ups and the loader's completion), 12 over the 4 buckets; whether the
// io_context takes two wake-ups as one round depends on the machine's load, and a round costs
// about 8 allocations (the limiter's post, the doorbell, the write completions; Asio's 2-block
// per-thread recycling caches miss as soon as more operations are in flight): 12 x 8 < 128.
// With the loader on the io_context the two counts are equal. An allocation per parameter or
// per write would add at least 480 (the large model has 480 parameters and 5248 writes more).
constexpr std::size_t slack = 128;

void check_independent_of_parameters(std::size_t loader_threads) {
  const measured small = run_versions(32, 2, loader_threads);
  const measured large = run_versions(128, 1, loader_threads);
  MESSAGE("version 3 allocations: " << small.allocations << " for " << small.parameters << " parameters ("
                                    << small.writes << " writes, " << small.buckets << " buckets), "
                                    << large.allocations << " for " << large.parameters << " parameters ("
                                    << large.writes << " writes, " << large.buckets << " buckets), "
                                    << large.wire_bytes << " bytes each; loader threads: " << loader_threads);
  REQUIRE(small.buckets == large.buckets);
  REQUIRE(small.wire_bytes == large.wire_bytes);
  REQUIRE(large.parameters == 4 * small.parameters);
  CHECK(large.allocations <= small.allocations + slack);
}

}  // namespace

TEST_CASE("allocations: a steady-state update allocates nothing per parameter (loader on the io_context)") {
  check_independent_of_parameters(0);
}

// With the loader on a thread, the loader wakes the io_context once per slice of the slot's
// bytes, not per parameter (pipeline.hpp, start_loads), so write rounds are bounded by bytes.
TEST_CASE("allocations: a steady-state update allocates nothing per parameter (loader thread)") {
  check_independent_of_parameters(1);
}
