#include <shardline/weights_receiver.hpp>

#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/transport/loopback.hpp>
#include <shardline/transport/shm/transport.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "../support/checks.hpp"
#include "../support/shard_pattern.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <future>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace sl = shardline;

using sl::testing::check_text;
using sl::testing::check_throws;
using sl::testing::drive;
using sl::testing::settle;

namespace {

using receiver_type = sl::weights_receiver<sl::loopback_transport::receiver>;

const sl::receiver_options shadowed{.shadow = true};  // not constexpr: commit_copy is a std::function

const std::string q_proj = "layers.0.self_attn.q_proj.weight";
const std::string k_proj = "layers.0.self_attn.k_proj.weight";
const std::string v_proj = "layers.0.self_attn.v_proj.weight";
const std::string o_proj = "layers.0.self_attn.o_proj.weight";
const std::string qkv_proj = "layers.0.self_attn.qkv_proj.weight";

// q/k/v fuse into qkv_proj [6, 4]; sender 0 holds q and k, sender 1 holds v and o.
sl::transfer_plan split_plan() {
  sl::plan_options options;
  options.senders = 2;
  options.sender_tensors = {{q_proj, k_proj}, {v_proj, o_proj}};
  const std::vector<sl::parameter_descriptor> layer{{q_proj, sl::dtype::bf16, {2, 4}},
                                                    {k_proj, sl::dtype::bf16, {2, 4}},
                                                    {v_proj, sl::dtype::bf16, {2, 4}},
                                                    {o_proj, sl::dtype::bf16, {4, 8}}};
  return sl::transfer_plan::build(layer, sl::shard_map::standard(), options);
}

struct commit_result {
  std::optional<std::error_code> ec;
  std::uint32_t version = 0;
  bool done() const { return ec.has_value(); }
};

// Every byte of receiver 0's parameter `p` is `version`'s (the shard pattern of the plan).
bool holds(const sl::transfer_plan& plan, std::span<const std::byte> live, const sl::parameter_descriptor& p,
           std::uint32_t version) {
  const auto want = sl::testing::expected_bytes(plan, 0, p, version);
  return live.size() == want.size() && std::equal(live.begin(), live.end(), want.begin());
}

bool all_bytes(std::span<const std::byte> bytes, std::byte value) {
  return std::all_of(bytes.begin(), bytes.end(), [value](std::byte b) { return b == value; });
}

// No exposed region holds any byte of `live`: senders cannot write it.
bool unexposed(const sl::region_table& table, std::span<const std::byte> live) {
  const auto at = reinterpret_cast<std::uintptr_t>(live.data());
  for (const auto& r : table.regions())
    if (r.length > 0 && r.address < at + live.size() && at < r.address + r.length) return false;
  return true;
}

// Receiver 0 of split_plan() with a shadow (laid out, or adopting `tensors`), its senders'
// connections, and the notices and writes sent by hand.
struct shadow_fixture {
  asio::io_context io;
  sl::transfer_plan plan = split_plan();
  sl::loopback_transport transport{io.get_executor()};
  sl::loopback_transport::receiver endpoint{io.get_executor()};
  receiver_type weights;
  std::optional<sl::loopback_transport::connection> c0, c1;

  shadow_fixture() : weights(endpoint, plan, 0, shadowed) { connect(); }
  explicit shadow_fixture(std::vector<sl::engine_tensor> tensors)
      : weights(endpoint, plan, 0, std::move(tensors), shadowed) {
    connect();
  }

  void connect() {
    c0.emplace(transport.connect(endpoint, {0, plan.fingerprint()}));
    c1.emplace(transport.connect(endpoint, {1, plan.fingerprint()}));
  }
  sl::loopback_transport::connection& link(std::uint32_t sender) { return sender == 0 ? *c0 : *c1; }

  void notify(std::uint32_t sender, sl::notice_kind kind, std::uint32_t version) {
    std::optional<std::error_code> ack;
    link(sender).async_notify(kind, version, [&ack](std::error_code ec) { ack = ec; });
    REQUIRE(drive(io, [&] { return ack.has_value(); }));
    REQUIRE_MESSAGE(!*ack, "notice " << sl::to_string(kind) << " " << version << ": " << ack->message());
  }

  // Sender `sender`'s part of `version` written through its connection, as its plan lays it out.
  void write(std::uint32_t sender, std::uint32_t version) {
    const sl::transfer_plan mine = plan.for_sender(sender);
    std::vector<std::vector<std::byte>> images;
    images.reserve(mine.parameter_count());
    std::vector<sl::write_request> requests;
    for (std::size_t i = 0; i < mine.parameter_count(); ++i) {
      const sl::planned_parameter& p = mine.parameter(i);
      auto& image = images.emplace_back(p.staging_bytes);
      for (const auto& s : p.parameter.shards)
        for (std::size_t b = 0; b < s.tensor.bytes(); ++b)
          image[s.offset + b] = sl::testing::pattern(s.tensor.name, version, b);
      const auto local = transport.register_memory(image).region();
      const sl::remote_region* region = link(sender).remote_regions().find(p.slice.name);
      REQUIRE(region != nullptr);
      for (const auto& w : p.writes)
        requests.push_back(sl::make_write(local, std::span(image).subspan(w.staging_offset, w.bytes), *region,
                                          w.destination_offset));
    }
    std::optional<std::error_code> done;
    link(sender).async_write(requests, [&done](std::error_code ec) { done = ec; });
    REQUIRE(drive(io, [&] { return done.has_value(); }));
    REQUIRE_MESSAGE(!*done, "write of sender " << sender << ": " << done->message());
  }

  // Both senders began `version` and wrote every byte of it; nobody committed yet.
  void write_all(std::uint32_t version) {
    notify(0, sl::notice_kind::begin, version);
    notify(1, sl::notice_kind::begin, version);
    write(0, version);
    write(1, version);
  }

  // A waiter that records, at its completion, whether live memory then held the version.
  void wait_commit(commit_result& out, bool* live_at_completion = nullptr) {
    weights.async_wait_commit([this, &out, live_at_completion](std::error_code ec, std::uint32_t v) {
      out.ec = ec;
      out.version = v;
      if (live_at_completion) *live_at_completion = !ec && live_holds(v);
    });
  }

  bool live_holds(std::uint32_t version) const {
    for (const auto& p : weights.parameters())
      if (!holds(plan, weights.parameter(p.name), p, version)) return false;
    return true;
  }

  void commit_version(std::uint32_t version) {
    commit_result r;
    wait_commit(r);
    write_all(version);
    notify(0, sl::notice_kind::commit, version);
    notify(1, sl::notice_kind::commit, version);
    REQUIRE(drive(io, [&] { return r.done(); }));
    REQUIRE(!*r.ec);
    REQUIRE(r.version == version);
  }
};

// The engine's tensors for receiver 0 of split_plan(), filled with `sentinel`.
struct engine_memory {
  explicit engine_memory(std::byte sentinel = std::byte{0xee})
      : qkv(48, sentinel), o(64, sentinel), extra(8, sentinel) {}
  std::vector<std::byte> qkv, o, extra;

  std::vector<sl::engine_tensor> tensors(sl::memory_location where = sl::memory_location::host()) {
    return {{qkv_proj, sl::dtype::bf16, {6, 4}, qkv, where},
            {o_proj, sl::dtype::bf16, {4, 8}, o, where},
            {"lm_head.weight", sl::dtype::f32, {2}, extra, where}};  // not planned: ignored
  }
};

}  // namespace

// Plan (layout) mode -------------------------------------------------------------------------

TEST_CASE("receiver shadow: senders see a shadow laid out like the live parameters, never the live bytes") {
  shadow_fixture f;
  CHECK(f.weights.shadowed());
  REQUIRE(f.endpoint.regions().size() == 2);
  for (const auto& p : f.weights.parameters()) {
    CAPTURE(p.name);
    const sl::remote_region* r = f.endpoint.regions().find(p.name);
    REQUIRE(r != nullptr);
    CHECK(r->length == p.bytes());
    CHECK(r->layout == sl::tensor_layout{p.type, p.shape});
    CHECK(r->location == sl::memory_location::host());
    CHECK(f.weights.parameter(p.name).size() == p.bytes());
    CHECK(unexposed(f.endpoint.regions(), f.weights.parameter(p.name)));
  }
  // The shadow keeps the live layout: the same distance between parameters.
  const auto live_gap = f.weights.parameter(o_proj).data() - f.weights.parameter(qkv_proj).data();
  const auto shadow_gap = static_cast<std::ptrdiff_t>(f.endpoint.regions().find(o_proj)->address -
                                                      f.endpoint.regions().find(qkv_proj)->address);
  CHECK(live_gap == shadow_gap);
}

TEST_CASE("receiver shadow: live bytes change only when the whole quorum committed, before the announcement") {
  shadow_fixture f;
  commit_result first;
  bool live_at_first = false;
  f.wait_commit(first, &live_at_first);
  f.write_all(1);
  settle(f.io);
  CHECK(!first.done());
  for (const auto& p : f.weights.parameters()) CHECK(all_bytes(f.weights.parameter(p.name), std::byte{0}));
  CHECK(!f.weights.state().dirty);
  CHECK(f.weights.state().shadow_dirty);
  CHECK(f.weights.state().target == 1);
  f.notify(0, sl::notice_kind::commit, 1);
  settle(f.io);
  CHECK(!first.done());  // sender 1 has not committed
  for (const auto& p : f.weights.parameters()) CHECK(all_bytes(f.weights.parameter(p.name), std::byte{0}));
  f.notify(1, sl::notice_kind::commit, 1);
  REQUIRE(drive(f.io, [&] { return first.done(); }));
  CHECK(!*first.ec);
  CHECK(first.version == 1);
  CHECK(live_at_first);  // copied before the waiter learnt of it
  CHECK(f.live_holds(1));
  CHECK(!f.weights.state().dirty);
  CHECK(!f.weights.state().shadow_dirty);
  CHECK(f.weights.committed_version() == 1u);

  // Version 2: every byte is in the shadow, the live bytes are still version 1's.
  commit_result second;
  bool live_at_second = false;
  f.wait_commit(second, &live_at_second);
  f.write_all(2);
  f.notify(1, sl::notice_kind::commit, 2);
  settle(f.io);
  CHECK(!second.done());
  CHECK(f.live_holds(1));
  f.notify(0, sl::notice_kind::commit, 2);
  REQUIRE(drive(f.io, [&] { return second.done(); }));
  CHECK(!*second.ec);
  CHECK(second.version == 2);
  CHECK(live_at_second);
  CHECK(f.live_holds(2));
}

TEST_CASE("receiver shadow: an aborted version leaves every live byte the previous version's; the shadow is dirty") {
  shadow_fixture f;
  f.commit_version(1);
  commit_result r;
  f.wait_commit(r);
  f.write_all(2);  // every byte of version 2 is in the shadow
  f.notify(0, sl::notice_kind::abort, 2);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  CHECK(*r.ec == sl::errc::version_abandoned);
  CHECK(r.version == 2);
  CHECK(f.live_holds(1));  // every byte
  const auto& state = f.weights.state();
  CHECK(!state.dirty);
  CHECK(state.committed == 1u);
  CHECK(state.shadow_dirty);
  CHECK(state.target == 2);
  check_text(state.reason, "aborted", {"sender 0", "version 2"});

  // Sender 1's commit of the abandoned version copies nothing.
  commit_result next;
  f.wait_commit(next);
  f.notify(1, sl::notice_kind::commit, 2);
  settle(f.io);
  CHECK(!next.done());
  CHECK(f.live_holds(1));

  f.write_all(3);
  f.notify(0, sl::notice_kind::commit, 3);
  f.notify(1, sl::notice_kind::commit, 3);
  REQUIRE(drive(f.io, [&] { return next.done(); }));
  CHECK(!*next.ec);
  CHECK(next.version == 3);
  CHECK(f.live_holds(3));
  CHECK(!f.weights.state().shadow_dirty);
}

TEST_CASE("receiver shadow: a sender disconnecting mid-version leaves live memory clean") {
  shadow_fixture f;
  f.commit_version(4);
  commit_result r;
  f.wait_commit(r);
  f.write_all(5);
  f.notify(0, sl::notice_kind::commit, 5);
  f.c1->close();
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  CHECK(*r.ec == sl::errc::version_abandoned);
  CHECK(f.live_holds(4));
  CHECK(!f.weights.state().dirty);
  CHECK(f.weights.state().shadow_dirty);
  check_text(f.weights.state().reason, "disconnected", {"sender 1", "version 5"});
}

TEST_CASE("receiver shadow: a withdraw by every sender that began leaves the shadow clean") {
  shadow_fixture f;
  f.commit_version(1);
  commit_result r;
  f.wait_commit(r);
  f.notify(0, sl::notice_kind::begin, 2);
  settle(f.io);
  CHECK(f.weights.state().shadow_dirty);
  CHECK(!f.weights.state().dirty);
  f.notify(0, sl::notice_kind::withdraw, 2);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  CHECK(*r.ec == sl::errc::version_abandoned);
  CHECK(!f.weights.state().shadow_dirty);
  CHECK(!f.weights.state().dirty);
  CHECK(f.live_holds(1));
}

// Adopt mode ---------------------------------------------------------------------------------

TEST_CASE("receiver shadow: adopt: the engine's tensors are never exposed and change only at commit") {
  engine_memory engine;
  shadow_fixture f(engine.tensors());
  CHECK(f.weights.parameter(qkv_proj).data() == engine.qkv.data());
  CHECK(f.weights.parameter(o_proj).data() == engine.o.data());
  REQUIRE(f.endpoint.regions().size() == 2);
  CHECK(f.endpoint.regions().find("lm_head.weight") == nullptr);
  CHECK(unexposed(f.endpoint.regions(), engine.qkv));
  CHECK(unexposed(f.endpoint.regions(), engine.o));
  CHECK(f.endpoint.regions().find(qkv_proj)->layout == sl::tensor_layout{sl::dtype::bf16, {6, 4}});
  CHECK(f.endpoint.regions().find(o_proj)->length == 64);

  commit_result r;
  bool live_at_commit = false;
  f.wait_commit(r, &live_at_commit);
  f.write_all(9);
  f.notify(0, sl::notice_kind::commit, 9);
  settle(f.io);
  CHECK(all_bytes(engine.qkv, std::byte{0xee}));
  CHECK(all_bytes(engine.o, std::byte{0xee}));
  f.notify(1, sl::notice_kind::commit, 9);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  CHECK(!*r.ec);
  CHECK(live_at_commit);
  CHECK(f.live_holds(9));
  CHECK(all_bytes(engine.extra, std::byte{0xee}));  // unplanned: untouched

  commit_result abandoned;
  f.wait_commit(abandoned);
  f.write_all(10);
  f.notify(1, sl::notice_kind::abort, 10);
  REQUIRE(drive(f.io, [&] { return abandoned.done(); }));
  CHECK(*abandoned.ec == sl::errc::version_abandoned);
  CHECK(f.live_holds(9));
  CHECK(!f.weights.state().dirty);
  CHECK(f.weights.state().shadow_dirty);
}

TEST_CASE("receiver shadow: adopt accepts host_pinned tensors; the shadow is the transport's host arena") {
  engine_memory engine;
  shadow_fixture f(engine.tensors(sl::memory_location::host_pinned()));
  CHECK(f.endpoint.regions().find(qkv_proj)->location == sl::memory_location::host());
  f.commit_version(2);
  CHECK(f.live_holds(2));
}

TEST_CASE("receiver shadow: adopt refuses a cuda_device tensor, naming it; nothing is exposed") {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  const auto plan = split_plan();
  engine_memory engine;
  auto tensors = engine.tensors();
  tensors[1].location = sl::memory_location::cuda(1);
  check_throws([&] { receiver_type weights(endpoint, plan, 0, tensors, shadowed); }, sl::errc::unsupported_memory,
               {"'" + o_proj + "'", "cuda_device:1", "device copy", "CUDA part"});
  CHECK(endpoint.regions().empty());
}

TEST_CASE("receiver shadow: an alignment that is not a power of two is refused in every mode") {
  asio::io_context io;
  const auto plan = split_plan();
  engine_memory engine;
  {
    sl::loopback_transport::receiver endpoint(io.get_executor());
    check_throws([&] { receiver_type w(endpoint, plan, 0, engine.tensors(), {.alignment = 48, .shadow = true}); },
                 sl::errc::invalid_argument, {"alignment 48", "not a power of two"});
    CHECK(endpoint.regions().empty());
  }
  {
    sl::loopback_transport::receiver endpoint(io.get_executor());
    check_throws([&] { receiver_type w(endpoint, plan, 0, {.alignment = 0, .shadow = true}); },
                 sl::errc::invalid_argument, {"alignment 0", "not a power of two"});
  }
  {
    sl::loopback_transport::receiver endpoint(io.get_executor());
    check_throws([&] { receiver_type w(endpoint, {{"w", sl::dtype::bf16, {2}}}, {.alignment = 3, .shadow = true}); },
                 sl::errc::invalid_argument, {"alignment 3", "not a power of two"});
  }
}

// Layout mode without a plan ------------------------------------------------------------------

TEST_CASE("receiver shadow: layout mode: live parameters are the receiver's own, aligned like the shadow") {
  asio::io_context io;
  sl::loopback_transport transport(io.get_executor());
  sl::loopback_transport::receiver endpoint(io.get_executor());
  receiver_type weights(endpoint, {{"a", sl::dtype::bf16, {3}}, {"b", sl::dtype::f32, {4}}},
                        {.alignment = 512, .shadow = true});
  REQUIRE(endpoint.regions().size() == 2);
  CHECK(weights.parameter("b").data() - weights.parameter("a").data() == 512);
  CHECK(endpoint.regions().find("b")->address - endpoint.regions().find("a")->address == 512);
  CHECK(reinterpret_cast<std::uintptr_t>(weights.parameter("a").data()) % 512 == 0);
  CHECK(unexposed(endpoint.regions(), weights.parameter("a")));
  CHECK(unexposed(endpoint.regions(), weights.parameter("b")));
  check_throws([&] { weights.parameter("c"); }, sl::errc::unknown_parameter, {"'c'"});

  auto conn = transport.connect(endpoint);
  commit_result r;
  weights.async_wait_commit([&](std::error_code ec, std::uint32_t v) {
    r.ec = ec;
    r.version = v;
  });
  std::vector<std::byte> a(6, std::byte{0x11}), b(16, std::byte{0x22});
  const auto la = transport.register_memory(a).region(), lb = transport.register_memory(b).region();
  const sl::write_request w[] = {sl::make_write(la, a, *conn.remote_regions().find("a")),
                                 sl::make_write(lb, b, *conn.remote_regions().find("b"))};
  std::optional<std::error_code> begun, written, acked;
  conn.async_notify(sl::notice_kind::begin, 1, [&](std::error_code ec) { begun = ec; });
  conn.async_write(w, [&](std::error_code ec) { written = ec; });
  REQUIRE(drive(io, [&] { return begun && written; }));
  settle(io);
  CHECK(all_bytes(weights.parameter("a"), std::byte{0}));
  CHECK(all_bytes(weights.parameter("b"), std::byte{0}));
  CHECK(weights.state().shadow_dirty);
  conn.async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { acked = ec; });
  REQUIRE(drive(io, [&] { return r.done(); }));
  CHECK(!*r.ec);
  CHECK(all_bytes(weights.parameter("a"), std::byte{0x11}));
  CHECK(all_bytes(weights.parameter("b"), std::byte{0x22}));
}

// Through the pipeline -------------------------------------------------------------------------

namespace {
std::vector<sl::parameter_descriptor> small_model() {
  std::vector<sl::parameter_descriptor> t;
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "self_attn.q_proj.weight", sl::dtype::bf16, {16, 16}});
    t.push_back({p + "self_attn.k_proj.weight", sl::dtype::bf16, {8, 16}});
    t.push_back({p + "self_attn.v_proj.weight", sl::dtype::bf16, {8, 16}});
    t.push_back({p + "mlp.gate_proj.weight", sl::dtype::bf16, {32, 16}});
    t.push_back({p + "mlp.up_proj.weight", sl::dtype::bf16, {32, 16}});
  }
  return t;
}

template <class Future>
auto run_update(asio::io_context& io, Future& f) {
  REQUIRE(drive(io, [&] { return f.wait_for(std::chrono::seconds(0)) == std::future_status::ready; }));
  return f.get();
}

asio::awaitable<void> accept_one(sl::shm_transport::receiver& endpoint) {
  co_await endpoint.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
}

template <class Weights>
bool live_holds(const sl::transfer_plan& plan, const Weights& weights, std::uint32_t version) {
  for (const auto& p : weights.parameters())
    if (!holds(plan, weights.parameter(p.name), p, version)) return false;
  return true;
}
}  // namespace

TEST_CASE("receiver shadow: a pipeline update lands live at commit; a failed one leaves live bytes as they were") {
  asio::io_context io;
  sl::plan_options options;
  options.bucket_bytes = 1024;  // several buckets
  const auto plan = sl::transfer_plan::build(small_model(), sl::shard_map::standard(), options);
  REQUIRE(plan.buckets().size() > 2);
  sl::loopback_transport transport(io.get_executor());
  sl::loopback_transport::receiver endpoint(io.get_executor());
  receiver_type weights(endpoint, plan, 0, shadowed);
  auto link = transport.connect(endpoint, {0, plan.fingerprint()});
  sl::pipeline_options on_io;
  on_io.loader_threads = 0;  // the loader below looks at the receiver
  sl::update_pipeline<sl::loopback_transport> pipeline(transport, plan, {&link}, on_io);

  std::optional<std::uint32_t> seen;
  bool live_at_commit = false;
  weights.async_wait_commit([&](std::error_code ec, std::uint32_t v) {
    if (ec) return;
    seen = v;
    live_at_commit = live_holds(plan, weights, v);
  });
  auto f = pipeline.async_update(1, sl::testing::fill, asio::use_future);
  run_update(io, f);
  REQUIRE(drive(io, [&] { return seen.has_value(); }));
  CHECK(*seen == 1);
  CHECK(live_at_commit);

  // Version 2 fails on its last shard, after the earlier buckets were written to the shadow:
  // the receiver gets an abort and live memory stays version 1's, every byte.
  commit_result r;
  weights.async_wait_commit([&](std::error_code ec, std::uint32_t v) {
    r.ec = ec;
    r.version = v;
  });
  const std::string last = plan.buckets().back().parameters.back().parameter.shards.back().tensor.name;
  bool live_stayed_while_loading = true;
  auto failing = [&](const sl::shard_load& load) {
    live_stayed_while_loading = live_stayed_while_loading && live_holds(plan, weights, 1);
    if (load.tensor.name == last) throw std::runtime_error("disk gone");
    sl::testing::fill(load);
  };
  auto g = pipeline.async_update(2, failing, asio::use_future);
  CHECK_THROWS_AS(run_update(io, g), sl::error);
  REQUIRE(drive(io, [&] { return r.done(); }));
  CHECK(*r.ec == sl::errc::version_abandoned);
  CHECK(r.version == 2);
  CHECK(live_stayed_while_loading);
  CHECK(live_holds(plan, weights, 1));
  CHECK(!weights.state().dirty);
  CHECK(weights.state().shadow_dirty);
  CHECK(weights.committed_version() == 1u);
}

// shm: engine tensors in plain memory, the shadow in the transport's memfd arena -------------

TEST_CASE("receiver shadow: over shm, adopt + shadow puts engine tensors in plain memory; without it shm refuses") {
  asio::io_context io;
  sl::plan_options options;
  options.bucket_bytes = 1024;
  const auto plan = sl::transfer_plan::build(small_model(), sl::shard_map::standard(), options);
  const std::string path = "/tmp/shardline-test-shadow-" + std::to_string(getpid()) + ".sock";
  sl::shm_transport::receiver endpoint(io.get_executor(), path);
  // The engine's tensors: plain heap memory, which shm cannot share.
  std::vector<std::vector<std::byte>> storage;
  std::vector<sl::engine_tensor> tensors;
  for (const auto& p : plan.receiver_parameters(0)) {
    storage.emplace_back(p.bytes(), std::byte{0xee});
    tensors.push_back({p.name, p.type, p.shape, storage.back()});
  }
  using shm_weights = sl::weights_receiver<sl::shm_transport::receiver>;
  try {
    shm_weights plain(endpoint, plan, 0, tensors);
    FAIL_CHECK("shm adopted plain memory without a shadow");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::unsupported_memory);
  }
  sl::shm_transport::receiver shadow_endpoint(io.get_executor(), path + "-2");
  shm_weights weights(shadow_endpoint, plan, 0, tensors, shadowed);
  for (std::size_t i = 0; i < tensors.size(); ++i) CHECK(unexposed(shadow_endpoint.regions(), tensors[i].bytes));
  asio::co_spawn(io, accept_one(shadow_endpoint), asio::detached);

  sl::shm_transport transport(io.get_executor());
  auto connected = transport.async_connect(path + "-2", {0, plan.fingerprint()}, asio::use_future);
  auto link = run_update(io, connected);
  sl::update_pipeline<sl::shm_transport> pipeline(transport, plan, {&link});
  std::optional<std::uint32_t> seen;
  bool live_at_commit = false;
  weights.async_wait_commit([&](std::error_code ec, std::uint32_t v) {
    if (ec) return;
    seen = v;
    live_at_commit = live_holds(plan, weights, v);
  });
  auto f = pipeline.async_update(3, sl::testing::fill, asio::use_future);
  run_update(io, f);
  REQUIRE(drive(io, [&] { return seen.has_value(); }));
  CHECK(*seen == 3);
  CHECK(live_at_commit);
  CHECK(weights.parameter(tensors[0].name).data() == storage[0].data());
}
