#include <shardline/pipeline.hpp>

#include <shardline/transport/loopback.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "../support/checks.hpp"
#include "../support/shard_pattern.hpp"

#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace sl = shardline;
using sl::testing::fill;
using sl::testing::pattern;
using namespace std::chrono_literals;

namespace {

std::vector<sl::parameter_descriptor> tiny_model(int layers = 2) {
  std::vector<sl::parameter_descriptor> t;
  auto add = [&t](std::string name, std::vector<std::int64_t> shape) {
    t.push_back({std::move(name), sl::dtype::bf16, std::move(shape)});
  };
  add("model.embed_tokens.weight", {32, 16});
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {16});
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


// What receiver r must hold for `version`, derived from the plan independently of the pipeline.
std::vector<std::byte> expected(const sl::transfer_plan& plan, std::size_t r,
                                const sl::parameter_descriptor& exposed, std::uint32_t version) {
  REQUIRE(plan.find(exposed.name) != nullptr);
  return sl::testing::expected_bytes(plan, r, exposed, version);
}

// Runs handlers until `done()`; fails instead of hanging when nothing happens for 20 s.
template <class Predicate>
void run_until(asio::io_context& io, Predicate done) {
  while (!done()) {
    if (io.stopped()) io.restart();
    if (io.run_one_for(20s) == 0 && !done()) FAIL("no progress for 20 s or no work left");
  }
}

template <class Future>
auto drive(asio::io_context& io, Future& f) {
  while (f.wait_for(0s) != std::future_status::ready) {
    if (io.stopped()) io.restart();
    if (io.run_one_for(20s) == 0 && f.wait_for(0s) != std::future_status::ready)
      FAIL("no progress for 20 s or no work left: the update hangs");
  }
  return f.get();
}

using config = sl::pipeline_config<2, sl::chrome_tracer>;
using pipeline_type = sl::update_pipeline<sl::loopback_transport, config>;

struct cluster {
  explicit cluster(sl::plan_options options = {}, std::vector<sl::parameter_descriptor> model = tiny_model())
      : plan(sl::transfer_plan::build(model, sl::shard_map::standard(), options)) {
    for (std::size_t r = 0; r < plan.receivers(); ++r) {
      endpoints.push_back(std::make_unique<sl::loopback_transport::receiver>(io.get_executor()));
      weights.push_back(std::make_unique<sl::weights_receiver<sl::loopback_transport::receiver>>(
          *endpoints.back(), plan, r));
      connections.push_back(transport.connect(*endpoints.back(), {0, plan.fingerprint()}));
    }
  }

  std::vector<sl::loopback_transport::connection*> links() {
    std::vector<sl::loopback_transport::connection*> v;
    for (auto& c : connections) v.push_back(&c);
    return v;
  }

  void check_all(std::uint32_t version) {
    for (std::size_t r = 0; r < plan.receivers(); ++r)
      for (const auto& p : weights[r]->parameters()) {
        auto got = weights[r]->parameter(p.name);
        auto want = expected(plan, r, p, version);
        INFO("receiver " << r << " parameter " << p.name);
        CHECK(std::memcmp(got.data(), want.data(), want.size()) == 0);
      }
  }

  // The first commit each receiver sees, recorded together with whether, at that moment,
  // every byte of that receiver was already in place; versions abandoned before it go to
  // `abandoned`.
  void watch_commits() {
    seen.assign(plan.receivers(), std::nullopt);
    complete_when_seen.assign(plan.receivers(), false);
    abandoned.assign(plan.receivers(), {});
    for (std::size_t r = 0; r < plan.receivers(); ++r) watch(r);
  }
  void watch(std::size_t r) {
      weights[r]->async_wait_commit([this, r](std::error_code ec, std::uint32_t v) {
        if (ec == sl::errc::version_abandoned) {
          abandoned[r].push_back(v);
          return watch(r);
        }
        if (ec) return;
        seen[r] = v;
        bool all = true;
        for (const auto& p : weights[r]->parameters()) {
          auto got = weights[r]->parameter(p.name);
          const bool same = std::memcmp(got.data(), expected(plan, r, p, v).data(), got.size()) == 0;
          if (!same) MESSAGE("at commit " << v << ": receiver " << r << " parameter " << p.name << " not in place");
          all = all && same;
        }
        complete_when_seen[r] = all;
      });
  }

  asio::io_context io;
  sl::loopback_transport transport{io.get_executor()};
  sl::transfer_plan plan;
  std::vector<std::unique_ptr<sl::loopback_transport::receiver>> endpoints;
  std::vector<std::unique_ptr<sl::weights_receiver<sl::loopback_transport::receiver>>> weights;
  std::vector<sl::loopback_transport::connection> connections;
  std::vector<std::optional<std::uint32_t>> seen;
  std::vector<bool> complete_when_seen;
  std::vector<std::vector<std::uint32_t>> abandoned;
};

template <class Loader>
std::exception_ptr update_error(cluster& c, pipeline_type& pipeline, std::uint32_t version,
                                Loader loader) {
  auto f = pipeline.async_update(version, loader, asio::use_future);
  try {
    drive(c.io, f);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

void check_error(std::exception_ptr e, std::error_code code, std::initializer_list<std::string> words) {
  REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const std::system_error& err) {
    CHECK(err.code() == code);
    const std::string what = err.what();
    for (const auto& w : words) {
      INFO("message: " << what);
      CHECK(what.find(w) != std::string::npos);
    }
  }
}

}  // namespace

TEST_CASE("pipeline: every byte lands and the commit comes after the last byte") {
  sl::plan_options options;
  options.bucket_bytes = 2048;  // several buckets
  cluster c(options);
  REQUIRE(c.plan.buckets().size() > 2);
  c.connections[0].set_completion_delay(1ms);  // writes land late, as on a wire
  pipeline_type pipeline(c.transport, c.plan, c.links());
  c.watch_commits();
  auto f = pipeline.async_update(7, fill, asio::use_future);
  const sl::update_report report = drive(c.io, f);
  c.io.run_for(10ms);  // deliver the commit notification
  c.check_all(7);
  REQUIRE(c.seen[0].has_value());
  CHECK(*c.seen[0] == 7);
  CHECK(c.complete_when_seen[0]);
  CHECK(report.version == 7);
  CHECK(report.buckets.size() == c.plan.buckets().size());
  CHECK(report.wire_bytes == c.plan.total_bytes());
  CHECK(pipeline.tracer().size() > 0);
}

TEST_CASE("pipeline: fan-out to tensor-parallel replicas writes each receiver its slice") {
  sl::plan_options options;
  options.tensor_parallel = 2;
  options.replicas = 2;
  options.bucket_bytes = 4096;
  cluster c(options);
  REQUIRE(c.plan.receivers() == 4);
  pipeline_type pipeline(c.transport, c.plan, c.links());
  c.watch_commits();
  auto f = pipeline.async_update(1, fill, asio::use_future);
  drive(c.io, f);
  c.io.run_for(10ms);
  c.check_all(1);
  for (std::size_t r = 0; r < 4; ++r) {
    INFO("receiver " << r);
    CHECK(c.seen[r] == std::optional<std::uint32_t>(1));
  }
}

TEST_CASE("pipeline: a staging slot is reused only after every write from it completed") {
  sl::plan_options options;
  options.bucket_bytes = 1024;
  cluster c(options);
  const std::size_t buckets = c.plan.buckets().size();
  REQUIRE(buckets > 4);
  // The loopback copies the source when the delay expires: a slot refilled too early would
  // deliver the next bucket's bytes, and check_all would see them.
  c.connections[0].set_completion_delay(3ms);
  pipeline_type pipeline(c.transport, c.plan, c.links());
  auto f = pipeline.async_update(3, fill, asio::use_future);
  const auto report = drive(c.io, f);
  c.check_all(3);
  for (std::size_t b = 2; b < buckets; ++b) {
    INFO("bucket " << b);
    CHECK(report.buckets[b].load_start >= report.buckets[b - 2].transfer_end);
  }
}

TEST_CASE("pipeline: works with a callback and with deferred, and runs versions back to back") {
  cluster c;
  pipeline_type pipeline(c.transport, c.plan, c.links());
  std::optional<std::uint32_t> done;
  pipeline.async_update(1, fill, [&done](std::exception_ptr e, sl::update_report r) {
    CHECK(!e);
    done = r.version;
  });
  run_until(c.io, [&done] { return done.has_value(); });
  CHECK(done == std::optional<std::uint32_t>(1));
  c.check_all(1);

  auto op = pipeline.async_update(2, fill, asio::experimental::deferred);
  std::optional<std::uint32_t> deferred_done;
  std::move(op)([&deferred_done](std::exception_ptr e, sl::update_report r) {
    CHECK(!e);
    deferred_done = r.version;
  });
  run_until(c.io, [&deferred_done] { return deferred_done.has_value(); });
  CHECK(deferred_done == std::optional<std::uint32_t>(2));
  c.check_all(2);
}

TEST_CASE("pipeline: an awaitable loader runs on the io_context") {
  cluster c;
  pipeline_type pipeline(c.transport, c.plan, c.links());
  auto loader = [](const sl::shard_load& load) -> asio::awaitable<void> {
    asio::steady_timer t(co_await asio::this_coro::executor, 100us);
    co_await t.async_wait(asio::use_awaitable);
    fill(load);
  };
  auto f = pipeline.async_update(4, loader, asio::use_future);
  drive(c.io, f);
  c.check_all(4);
}

TEST_CASE("pipeline: a loader that throws fails the update, naming parameter and shard") {
  cluster c;
  pipeline_type pipeline(c.transport, c.plan, c.links());
  c.watch_commits();
  auto loader = [](const sl::shard_load& load) {
    if (load.tensor.name == "model.layers.1.self_attn.k_proj.weight")
      throw std::runtime_error("disk on fire");
    fill(load);
  };
  check_error(update_error(c, pipeline, 1, loader), sl::errc::loader_failed,
              {"model.layers.1.self_attn.qkv_proj.weight", "k_proj", "disk on fire"});
  // Version 1 was never committed: the first commit any receiver sees is version 2.
  auto f = pipeline.async_update(2, fill, asio::use_future);
  drive(c.io, f);
  c.io.run_for(10ms);
  CHECK(c.seen[0] == std::optional<std::uint32_t>(2));
  CHECK(c.complete_when_seen[0]);
}

TEST_CASE("pipeline: a shard that never arrives times out, listing what is missing") {
  cluster c;
  sl::pipeline_options options;
  options.shard_timeout = 50ms;
  pipeline_type pipeline(c.transport, c.plan, c.links(), options);
  c.watch_commits();
  auto loader = [](const sl::shard_load& load) -> asio::awaitable<void> {
    if (load.tensor.name == "model.layers.0.self_attn.v_proj.weight") {
      asio::steady_timer forever(co_await asio::this_coro::executor, 1h);
      co_await forever.async_wait(asio::use_awaitable);  // cancelled by the pipeline's abort
    }
    fill(load);
  };
  check_error(update_error(c, pipeline, 1, loader), sl::errc::shard_timeout,
              {"model.layers.0.self_attn.qkv_proj.weight", "v_proj"});
  auto f = pipeline.async_update(2, fill, asio::use_future);
  drive(c.io, f);
  c.io.run_for(10ms);
  CHECK(c.seen[0] == std::optional<std::uint32_t>(2));
}

TEST_CASE("pipeline: a receiver that goes away mid-update fails it; nothing is committed") {
  sl::plan_options options;
  options.replicas = 2;
  options.bucket_bytes = 2048;
  cluster c(options);
  sl::pipeline_options on_io_thread;  // the loader below touches the receiver
  on_io_thread.loader_threads = 0;
  pipeline_type pipeline(c.transport, c.plan, c.links(), on_io_thread);
  c.watch_commits();
  int loads = 0;
  auto loader = [&c, &loads](const sl::shard_load& load) {
    if (++loads == 6) c.endpoints[1]->close();
    fill(load);
  };
  check_error(update_error(c, pipeline, 1, loader), sl::errc::peer_disconnected,
              {"parameter '", "receiver 1"});
  c.io.run_for(10ms);
  CHECK(!c.seen[0].has_value());
  CHECK(!c.seen[1].has_value());
}

TEST_CASE("pipeline: cancelling an update in flight releases everything and commits nothing") {
  sl::plan_options options;
  options.bucket_bytes = 1024;
  cluster c(options);
  c.connections[0].set_completion_delay(2ms);
  pipeline_type pipeline(c.transport, c.plan, c.links());
  c.watch_commits();
  asio::cancellation_signal cancel;
  int loads = 0;
  auto loader = [&cancel, &loads, &c](const sl::shard_load& load) {
    fill(load);
    if (++loads == 5) asio::post(c.io, [&cancel] { cancel.emit(asio::cancellation_type::terminal); });
  };
  auto f = pipeline.async_update(1, loader, asio::bind_cancellation_slot(cancel.slot(), asio::use_future));
  std::exception_ptr e;
  try {
    drive(c.io, f);
  } catch (...) {
    e = std::current_exception();
  }
  check_error(e, asio::error::operation_aborted, {"version 1 cancelled"});
  // The pipeline is whole again: the next version goes through and is the first committed.
  auto g = pipeline.async_update(2, fill, asio::use_future);
  drive(c.io, g);
  c.io.run_for(20ms);
  CHECK(c.seen[0] == std::optional<std::uint32_t>(2));
  CHECK(c.complete_when_seen[0]);
}

TEST_CASE("pipeline: a receiver without a planned parameter or with another size is refused") {
  cluster c;
  auto plan = c.plan;
  // A receiver that exposes one parameter too few, and one that exposes it smaller.
  auto params = plan.receiver_parameters(0);
  const std::string victim = params.back().name;
  params.pop_back();
  sl::loopback_transport::receiver missing(c.io.get_executor());
  sl::weights_receiver<sl::loopback_transport::receiver> w1(missing, params);
  auto conn1 = c.transport.connect(missing);
  const std::string quoted = "'" + victim + "'";
  CHECK_THROWS_WITH_AS(pipeline_type(c.transport, plan, {&conn1}),
                       doctest::Contains(quoted.c_str()), sl::error);
  try {
    pipeline_type p(c.transport, plan, {&conn1});
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::unknown_parameter);
  }

  auto shrunk = plan.receiver_parameters(0);
  shrunk.front().shape.back() -= 1;
  sl::loopback_transport::receiver small(c.io.get_executor());
  sl::weights_receiver<sl::loopback_transport::receiver> w2(small, shrunk);
  auto conn2 = c.transport.connect(small);
  try {
    pipeline_type p(c.transport, plan, {&conn2});
    FAIL("a size mismatch was accepted");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::size_mismatch);
    CHECK(std::string(e.what()).find(shrunk.front().name) != std::string::npos);
  }
  CHECK_THROWS_AS(pipeline_type(c.transport, plan, {}), sl::error);  // receiver count
}

TEST_CASE("pipeline: a parameter bigger than the in-flight byte limit is an error, not a hang") {
  cluster c;
  sl::pipeline_options options;
  options.limits = sl::inflight_limits{8, 64};
  pipeline_type pipeline(c.transport, c.plan, c.links(), options);
  check_error(update_error(c, pipeline, 1, fill), sl::errc::request_too_large,
              {"parameter '", "max_bytes = 64"});
}

namespace {
// An asynchronous loader that counts the shards it loaded and, at the `at`-th, emits
// `type` on `cancel` (posted, as a user's cancel button would be).
struct cancelling_loader {
  asio::io_context* io;
  asio::cancellation_signal* cancel;
  asio::cancellation_type type;
  int at;
  int* loads;
  asio::awaitable<void> operator()(const sl::shard_load& load) const {
    asio::steady_timer t(co_await asio::this_coro::executor, 200us);
    co_await t.async_wait(asio::use_awaitable);
    fill(load);
    if (++*loads == at) asio::post(*io, [c = cancel, ty = type] { c->emit(ty); });
  }
};

std::size_t shards_of_bucket(const sl::transfer_plan& plan, std::size_t b) {
  std::size_t n = 0;
  for (const auto& p : plan.buckets()[b].parameters) n += p.parameter.shards.size();
  return n;
}

std::size_t shards_of_plan(const sl::transfer_plan& plan) {
  std::size_t n = 0;
  for (std::size_t b = 0; b < plan.buckets().size(); ++b) n += shards_of_bucket(plan, b);
  return n;
}

std::exception_ptr run_cancelled(cluster& c, pipeline_type& pipeline, std::uint32_t version,
                                 cancelling_loader loader, asio::cancellation_signal& cancel) {
  auto f = pipeline.async_update(version, loader, asio::bind_cancellation_slot(cancel.slot(), asio::use_future));
  try {
    drive(c.io, f);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}
}  // namespace

TEST_CASE("pipeline: terminal cancellation stops loading at once and commits nothing") {
  sl::plan_options options;
  options.bucket_bytes = 1024;
  cluster c(options);
  REQUIRE(c.plan.buckets().size() > 3);
  sl::pipeline_options one_slot;
  one_slot.depth = 1;
  pipeline_type pipeline(c.transport, c.plan, c.links(), one_slot);
  c.watch_commits();
  asio::cancellation_signal cancel;
  int loads = 0;
  const int at = static_cast<int>(shards_of_bucket(c.plan, 0)) + 1;  // inside bucket 1
  auto e = run_cancelled(c, pipeline, 1, {&c.io, &cancel, asio::cancellation_type::terminal, at, &loads}, cancel);
  check_error(e, asio::error::operation_aborted, {"version 1 cancelled (terminal)"});
  // The cancel is posted after load `at`; at most the shard being loaded then finishes.
  CHECK(loads >= at);
  CHECK(loads <= at + 1);
  CHECK(static_cast<std::size_t>(loads) < shards_of_plan(c.plan));
  c.io.run_for(10ms);
  CHECK(!c.seen[0].has_value());
  CHECK(c.weights[0]->state().dirty);
  CHECK(c.weights[0]->state().target == 1);
  // The same connections carry the next version whole.
  auto g = pipeline.async_update(2, fill, asio::use_future);
  drive(c.io, g);
  c.io.run_for(10ms);
  CHECK(c.seen[0] == std::optional<std::uint32_t>(2));
  CHECK(c.complete_when_seen[0]);
  CHECK(!c.weights[0]->state().dirty);
}

TEST_CASE("pipeline: partial cancellation finishes the buckets already started, starts no other") {
  sl::plan_options options;
  options.bucket_bytes = 4096;
  cluster c(options);
  REQUIRE(c.plan.buckets().size() > 2);
  sl::pipeline_options one_slot;
  one_slot.depth = 1;  // exactly one bucket is started at any time
  pipeline_type pipeline(c.transport, c.plan, c.links(), one_slot);
  c.watch_commits();
  asio::cancellation_signal cancel;
  int loads = 0;
  const auto first = shards_of_bucket(c.plan, 0), second = shards_of_bucket(c.plan, 1);
  REQUIRE(second > 1);
  // Cancelled at the first load of bucket 1: bucket 1 is loaded and written whole, bucket 2
  // never begins.
  const int at = static_cast<int>(first) + 1;
  auto e = run_cancelled(c, pipeline, 1, {&c.io, &cancel, asio::cancellation_type::partial, at, &loads}, cancel);
  check_error(e, asio::error::operation_aborted, {"version 1 cancelled (partial)"});
  CHECK(static_cast<std::size_t>(loads) == first + second);
  for (const auto& p : c.plan.buckets()[1].parameters) {
    auto got = c.weights[0]->parameter(p.slice.name);
    auto want = expected(c.plan, 0, p.slice, 1);
    CHECK(std::memcmp(got.data(), want.data(), want.size()) == 0);
  }
  c.io.run_for(10ms);
  CHECK(!c.seen[0].has_value());
  CHECK(c.abandoned[0] == std::vector<std::uint32_t>{1});
}

TEST_CASE("pipeline: total cancellation is honoured only before the first write") {
  sl::plan_options options;
  options.bucket_bytes = 1024;
  SUBCASE("before any write: stops, and the receivers' memory stays clean") {
    cluster c(options);
    sl::pipeline_options one_slot;
    one_slot.depth = 1;
    pipeline_type pipeline(c.transport, c.plan, c.links(), one_slot);
    // Load 1 is the whole first parameter; cancelled inside it, nothing is written.
    REQUIRE(c.plan.buckets()[0].parameters[0].parameter.shards.size() == 1);
    c.watch_commits();
    asio::cancellation_signal cancel;
    int loads = 0;
    // Cancel from inside the first load, before it completes: nothing can be written yet.
    auto loader = [&](const sl::shard_load& load) -> asio::awaitable<void> {
      if (++loads == 1) cancel.emit(asio::cancellation_type::total);
      asio::steady_timer t(co_await asio::this_coro::executor, 200us);
      co_await t.async_wait(asio::use_awaitable);
      fill(load);
    };
    auto f = pipeline.async_update(1, loader, asio::bind_cancellation_slot(cancel.slot(), asio::use_future));
    std::exception_ptr e;
    try {
      drive(c.io, f);
    } catch (...) {
      e = std::current_exception();
    }
    check_error(e, asio::error::operation_aborted, {"total, before any write"});
    CHECK(loads == 1);
    CHECK(pipeline.last_report().wire_bytes == 0);
    c.io.run_for(10ms);
    CHECK(!c.weights[0]->state().dirty);
    CHECK(c.abandoned[0] == std::vector<std::uint32_t>{1});
  }
  SUBCASE("after a write: ignored, the update completes and commits") {
    cluster c(options);
    sl::pipeline_options one_slot;
    one_slot.depth = 1;
    pipeline_type pipeline(c.transport, c.plan, c.links(), one_slot);
    c.watch_commits();
    asio::cancellation_signal cancel;
    int loads = 0;
    const int at = static_cast<int>(shards_of_bucket(c.plan, 0)) + 2;  // bucket 0 was written by then
    auto e = run_cancelled(c, pipeline, 1, {&c.io, &cancel, asio::cancellation_type::total, at, &loads}, cancel);
    CHECK(!e);
    CHECK(static_cast<std::size_t>(loads) == shards_of_plan(c.plan));
    c.io.run_for(10ms);
    CHECK(c.seen[0] == std::optional<std::uint32_t>(1));
    c.check_all(1);
  }
}

TEST_CASE("pipeline: the commit is acknowledged; a receiver gone after the last write fails the update, naming it") {
  sl::plan_options options;
  options.replicas = 2;
  cluster c(options);
  // Receiver 1 queues one notice and nobody reads its notices: the begin fills the queue,
  // so the commit waits for its acknowledgement after every byte of the version landed.
  sl::loopback_transport::receiver tight(c.io.get_executor(), 1);
  sl::weights_receiver<sl::loopback_transport::receiver> held(tight, c.plan, 1);
  auto link = c.transport.connect(tight, {0, c.plan.fingerprint()});
  pipeline_type pipeline(c.transport, c.plan, {&c.connections[0], &link});
  auto f = pipeline.async_update(1, fill, asio::use_future);
  while (c.io.run_one_for(200ms) > 0) {
  }
  REQUIRE(f.wait_for(0s) != std::future_status::ready);
  for (const auto& p : held.parameters()) {
    auto want = expected(c.plan, 1, p, 1);
    CHECK(std::memcmp(held.parameter(p.name).data(), want.data(), want.size()) == 0);
  }
  tight.close();  // the rollout process dies before acknowledging the commit
  std::exception_ptr e;
  try {
    drive(c.io, f);
  } catch (...) {
    e = std::current_exception();
  }
  check_error(e, sl::errc::peer_disconnected, {"commit of version 1: receiver 1", "acknowledged by: 0"});
  CHECK(pipeline.last_report().committed == std::vector<std::size_t>{0});
}

TEST_CASE("pipeline: a receiver that never acknowledges the commit fails the update with ack_timeout, naming it") {
  sl::plan_options options;
  options.replicas = 2;
  cluster c(options);
  // Receiver 1 is alive but never reads its notices: its queue holds one, the begin fills it,
  // and the commit is never acknowledged.
  sl::loopback_transport::receiver stuck(c.io.get_executor(), 1);
  sl::weights_receiver<sl::loopback_transport::receiver> held(stuck, c.plan, 1);
  auto link = c.transport.connect(stuck, {0, c.plan.fingerprint()});
  sl::pipeline_options short_wait;
  short_wait.ack_timeout = 50ms;
  pipeline_type pipeline(c.transport, c.plan, {&c.connections[0], &link}, short_wait);
  c.watch_commits();
  const auto e = update_error(c, pipeline, 3, fill);
  check_error(e, sl::errc::ack_timeout,
              {"receiver 1 did not acknowledge the commit of version 3 within 50 ms", "acknowledged by: 0"});
  try {
    std::rethrow_exception(e);
  } catch (const sl::error& err) {
    sl::testing::check_text(err.what(), "peer did not acknowledge in time", {"receiver 1"});
  }
  CHECK(pipeline.last_report().committed == std::vector<std::size_t>{0});
  c.io.run_for(10ms);
  CHECK(c.seen[0] == std::optional<std::uint32_t>(3));  // receiver 0 acknowledged and announced it
  c.watch(0);

  // The next version: receiver 1 still reads nothing, so its begin times out; the others
  // get a withdraw (nothing was written) and the pipeline stays usable.
  check_error(update_error(c, pipeline, 4, fill), sl::errc::ack_timeout,
              {"receiver 1 did not acknowledge the begin of version 4 within 50 ms"});
  CHECK(pipeline.last_report().committed.empty());
  CHECK(pipeline.last_report().wire_bytes == 0);
  c.io.run_for(10ms);
  CHECK(c.abandoned[0] == std::vector<std::uint32_t>{4});
  pipeline.drop_receiver(1);
  auto f = pipeline.async_update(5, fill, asio::use_future);
  CHECK(drive(c.io, f).committed == std::vector<std::size_t>{0});
}

TEST_CASE("pipeline: a receiver that never acknowledges the begin fails the update before any write") {
  sl::plan_options options;
  options.replicas = 2;
  cluster c(options);
  sl::loopback_transport::receiver silent(c.io.get_executor(), 0);  // no room: nothing is ever acknowledged
  sl::weights_receiver<sl::loopback_transport::receiver> held(silent, c.plan, 1);
  auto link = c.transport.connect(silent, {0, c.plan.fingerprint()});
  sl::pipeline_options short_wait;
  short_wait.ack_timeout = 1s;
  pipeline_type pipeline(c.transport, c.plan, {&c.connections[0], &link}, short_wait);
  c.watch_commits();
  check_error(update_error(c, pipeline, 1, fill), sl::errc::ack_timeout,
              {"receiver 1 did not acknowledge the begin of version 1 within 1 s"});
  CHECK(pipeline.last_report().wire_bytes == 0);
  c.io.run_for(10ms);
  CHECK(!c.seen[0].has_value());
  CHECK(c.abandoned[0] == std::vector<std::uint32_t>{1});  // receiver 0 got the withdraw
  CHECK(!c.weights[0]->state().dirty);
}

TEST_CASE("pipeline: an ack_timeout that is not positive is refused, naming it") {
  cluster c;
  for (auto bad : {0ms, -5ms}) {
    sl::pipeline_options options;
    options.ack_timeout = bad;
    CAPTURE(bad.count());
    const std::string said = "ack_timeout is " + std::to_string(bad.count()) + " ms: it must be positive";
    sl::testing::check_throws([&] { pipeline_type refused(c.transport, c.plan, c.links(), options); },
                              sl::errc::invalid_argument, {said});
  }
  sl::pipeline_options unbounded;
  unbounded.ack_timeout = std::chrono::milliseconds::max();
  pipeline_type pipeline(c.transport, c.plan, c.links(), unbounded);
  auto f = pipeline.async_update(1, fill, asio::use_future);
  CHECK(drive(c.io, f).committed == std::vector<std::size_t>{0});
}

TEST_CASE("pipeline: membership: drop a dead receiver and go on; attach a new one and it gets the next version whole") {
  sl::plan_options options;
  options.replicas = 2;
  cluster c(options);
  pipeline_type pipeline(c.transport, c.plan, c.links());
  c.watch_commits();
  auto f = pipeline.async_update(1, fill, asio::use_future);
  drive(c.io, f);
  c.endpoints[1]->close();
  check_error(update_error(c, pipeline, 2, fill), sl::errc::peer_disconnected, {"receiver 1"});
  pipeline.drop_receiver(1);
  CHECK(!pipeline.attached(1));
  auto g = pipeline.async_update(3, fill, asio::use_future);
  CHECK(drive(c.io, g).committed == std::vector<std::size_t>{0});
  // A new rollout engine takes the empty place and receives version 4 in full.
  sl::loopback_transport::receiver fresh(c.io.get_executor());
  sl::weights_receiver<sl::loopback_transport::receiver> fresh_weights(fresh, c.plan, 1);
  auto link = c.transport.connect(fresh, {0, c.plan.fingerprint()});
  pipeline.attach_receiver(1, link);
  std::optional<std::uint32_t> fresh_seen;
  fresh_weights.async_wait_commit([&](std::error_code ec, std::uint32_t v) {
    if (!ec) fresh_seen = v;
  });
  auto h = pipeline.async_update(4, fill, asio::use_future);
  CHECK(drive(c.io, h).committed == std::vector<std::size_t>{0, 1});
  c.io.run_for(10ms);
  CHECK(fresh_seen == std::optional<std::uint32_t>(4));
  for (const auto& p : fresh_weights.parameters()) {
    auto want = expected(c.plan, 1, p, 4);
    CHECK(std::memcmp(fresh_weights.parameter(p.name).data(), want.data(), want.size()) == 0);
  }
  CHECK_THROWS_WITH_AS(pipeline.drop_receiver(2), doctest::Contains("receiver 2 does not exist"), sl::error);
}

TEST_CASE("pipeline: a receiver tensor with the same bytes but another shape or dtype is refused before any write") {
  cluster c;
  auto params = c.plan.receiver_parameters(0);
  auto transposed = params;
  std::size_t victim = 0;
  while (transposed[victim].shape.size() != 2 || transposed[victim].shape[0] == transposed[victim].shape[1]) ++victim;
  std::swap(transposed[victim].shape[0], transposed[victim].shape[1]);
  sl::loopback_transport::receiver r1(c.io.get_executor());
  sl::weights_receiver<sl::loopback_transport::receiver> w1(r1, transposed);
  auto conn1 = c.transport.connect(r1);
  try {
    pipeline_type p(c.transport, c.plan, {&conn1});
    FAIL("a transposed tensor was accepted");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::layout_mismatch);
    const std::string what = e.what();
    CHECK(what.find(params[victim].name) != std::string::npos);
    CHECK(what.find(sl::to_string(sl::tensor_layout{params[victim].type, params[victim].shape})) != std::string::npos);
    CHECK(what.find(sl::to_string(sl::tensor_layout{transposed[victim].type, transposed[victim].shape})) != std::string::npos);
  }
  auto retyped = params;
  retyped[victim].type = sl::dtype::f16;  // bf16 -> f16: same bytes
  sl::loopback_transport::receiver r2(c.io.get_executor());
  sl::weights_receiver<sl::loopback_transport::receiver> w2(r2, retyped);
  auto conn2 = c.transport.connect(r2);
  CHECK_THROWS_WITH_AS(pipeline_type(c.transport, c.plan, {&conn2}), doctest::Contains("f16"), sl::error);
}

TEST_CASE("pipeline: the reported efficiency uses a true lower bound and never exceeds 1") {
  sl::plan_options options;
  options.bucket_bytes = 2048;
  cluster c(options);
  c.connections[0].set_wire_rate(50e6);
  pipeline_type pipeline(c.transport, c.plan, c.links());
  for (std::uint32_t v = 1; v <= 3; ++v) {
    auto f = pipeline.async_update(v, fill, asio::use_future);
    const auto report = drive(c.io, f);
    CHECK(report.lower_bound() <= report.elapsed());
    CHECK(report.load_busy() <= report.elapsed());
    CHECK(report.transfer_busy() <= report.elapsed());
    CHECK(report.overlap_efficiency() <= 1.0);
    CHECK(report.overlap_efficiency() > 0.0);
  }
}

TEST_CASE("pipeline: several senders, each writing its own shards straight into the fused parameters") {
  // q, k and v of every layer on three different senders, tensor parallel 2.
  sl::plan_options options;
  options.tensor_parallel = 2;
  options.senders = 3;
  options.bucket_bytes = 2048;
  options.sender_of = [](const sl::parameter_descriptor& t) -> std::size_t {
    if (t.name.find("k_proj") != std::string::npos) return 1;
    if (t.name.find("v_proj") != std::string::npos) return 2;
    return 0;
  };
  cluster c(options);
  c.watch_commits();
  // Each sender connects below; the cluster's own sender-0 links would hold that id.
  for (auto& link : c.connections) link.close();
  std::vector<sl::transfer_plan> parts;
  std::vector<std::vector<sl::loopback_transport::connection>> links(3);
  std::vector<std::unique_ptr<pipeline_type>> senders;
  for (std::uint32_t s = 0; s < 3; ++s) {
    parts.push_back(c.plan.for_sender(s));
    std::vector<sl::loopback_transport::connection*> mine;
    for (auto& e : c.endpoints) links[s].push_back(c.transport.connect(*e, {s, c.plan.fingerprint()}));
    for (auto& l : links[s]) mine.push_back(&l);
    senders.push_back(std::make_unique<pipeline_type>(c.transport, parts[s], mine));
  }
  CHECK_THROWS_WITH_AS(pipeline_type(c.transport, c.plan, c.links()),
                       doctest::Contains("give each sender's pipeline plan.for_sender(s)"), sl::error);
  const auto push = [&](std::uint32_t version, std::size_t count) {
    std::vector<std::future<sl::update_report>> done;
    for (std::size_t s = 0; s < count; ++s) done.push_back(senders[s]->async_update(version, fill, asio::use_future));
    for (auto& f : done) drive(c.io, f);
  };
  // Two of three senders committed: nobody announces the version yet.
  push(1, 2);
  c.io.run_for(10ms);
  CHECK(!c.seen[0].has_value());
  auto last = senders[2]->async_update(1, fill, asio::use_future);
  drive(c.io, last);
  c.io.run_for(10ms);
  for (std::size_t r = 0; r < 2; ++r) {
    CHECK(c.seen[r] == std::optional<std::uint32_t>(1));
    CHECK(c.complete_when_seen[r]);
  }
  c.check_all(1);

  // Sender 1 dies in the middle of version 2: no receiver announces it, each names sender 1.
  c.watch_commits();
  int loads = 0;
  auto dying = [&](const sl::shard_load& load) {
    fill(load);
    if (++loads == 2) asio::post(c.io, [&] { for (auto& l : links[1]) l.close(); });
  };
  sl::pipeline_options on_io;
  on_io.loader_threads = 0;
  auto a = senders[0]->async_update(2, fill, asio::use_future);
  auto b = senders[2]->async_update(2, fill, asio::use_future);
  auto dies = std::make_unique<pipeline_type>(c.transport, parts[1],
                                              std::vector<sl::loopback_transport::connection*>{&links[1][0], &links[1][1]}, on_io);
  auto d = dies->async_update(2, dying, asio::use_future);
  drive(c.io, a);
  drive(c.io, b);
  CHECK_THROWS_AS(drive(c.io, d), sl::error);
  c.io.run_for(10ms);
  for (std::size_t r = 0; r < 2; ++r) {
    CHECK(!c.seen[r].has_value());
    CHECK(c.abandoned[r] == std::vector<std::uint32_t>{2});
    CHECK(c.weights[r]->state().dirty);
    CHECK(c.weights[r]->state().reason.find("sender 1") != std::string::npos);
  }
  // The trainer rank restarts: new connections, the same id; version 3 lands everywhere.
  dies.reset();
  links[1].clear();
  std::vector<sl::loopback_transport::connection*> again;
  for (auto& e : c.endpoints) links[1].push_back(c.transport.connect(*e, {1, c.plan.fingerprint()}));
  for (auto& l : links[1]) again.push_back(&l);
  senders[1] = std::make_unique<pipeline_type>(c.transport, parts[1], again);
  push(3, 3);
  c.io.run_for(10ms);
  for (std::size_t r = 0; r < 2; ++r) CHECK(c.seen[r] == std::optional<std::uint32_t>(3));
  c.check_all(3);
}
