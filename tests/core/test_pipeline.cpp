#include <shardline/pipeline.hpp>

#include <shardline/loopback_transport.hpp>
#include <shardline/shard_map.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

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
  const auto* p = plan.find(exposed.name);
  REQUIRE(p != nullptr);
  std::vector<std::byte> full(p->parameter.destination.bytes());
  for (const auto& s : p->parameter.shards)
    for (std::size_t i = 0; i < s.tensor.bytes(); ++i)
      full[s.offset + i] = pattern(s.tensor.name, version, i);
  std::vector<std::byte> mine(exposed.bytes());
  for (const auto& w : p->writes)
    if (w.receiver == r)
      std::memcpy(mine.data() + w.destination_offset, full.data() + w.staging_offset, w.bytes);
  return mine;
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
          *endpoints.back(), plan.receiver_parameters(r)));
      connections.push_back(transport.connect(*endpoints.back()));
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
  // every byte of that receiver was already in place.
  void watch_commits() {
    seen.assign(plan.receivers(), std::nullopt);
    complete_when_seen.assign(plan.receivers(), false);
    for (std::size_t r = 0; r < plan.receivers(); ++r)
      weights[r]->async_wait_commit([this, r](std::error_code ec, std::uint32_t v) {
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
              {"parameter '", "bytes in flight"});
}
