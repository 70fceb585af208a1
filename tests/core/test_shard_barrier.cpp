#include <shardline/async/shard_barrier.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <optional>
#include <string>

namespace sl = shardline;
using namespace std::chrono_literals;

// poll() leaves the context stopped once it runs out of work: restart it each time.
static void run_ready(asio::io_context& io) {
  io.restart();
  io.poll();
}

namespace {
const std::string qkv = "model.layers.0.self_attn.qkv_proj.weight";

struct fixture {
  asio::io_context io;
  sl::shard_barrier barrier{io.get_executor()};
  fixture() { barrier.expect(qkv, 3, {"q_proj", "k_proj", "v_proj"}); }
};

std::error_code thrown_code(auto&& f) {
  try {
    f();
  } catch (const sl::error& e) {
    return e.code();
  }
  return {};
}
}  // namespace

TEST_CASE("shard_barrier: a wait completes only once every shard arrived") {
  fixture f;
  std::optional<std::error_code> result;
  f.barrier.async_wait(qkv, 10s, [&result](std::error_code ec) { result = ec; });
  f.barrier.arrive(qkv, 0);
  f.barrier.arrive(qkv, 2);
  run_ready(f.io);
  CHECK(!result);
  CHECK(!f.barrier.ready(qkv));
  f.barrier.arrive(qkv, 1);
  CHECK(f.barrier.ready(qkv));
  CHECK(!result);  // never completed from inside arrive()
  run_ready(f.io);
  REQUIRE(result);
  CHECK(!*result);
}

TEST_CASE("shard_barrier: a wait after the last arrival completes, posted, with success") {
  fixture f;
  for (std::size_t s = 0; s < 3; ++s) f.barrier.arrive(qkv, s);
  std::optional<std::error_code> result;
  f.barrier.async_wait(qkv, 10s, [&result](std::error_code ec) { result = ec; });
  CHECK(!result);
  f.io.run();
  CHECK(result == std::optional<std::error_code>(std::error_code{}));
}

TEST_CASE("shard_barrier: bad shards are errors that name the parameter and the shard") {
  fixture f;
  f.barrier.arrive(qkv, 1);
  CHECK(thrown_code([&] { f.barrier.arrive(qkv, 1); }) == sl::errc::duplicate_shard);
  CHECK(thrown_code([&] { f.barrier.arrive(qkv, 3); }) == sl::errc::too_many_shards);
  CHECK(thrown_code([&] { f.barrier.arrive("nope", 0); }) == sl::errc::unknown_parameter);
  CHECK_THROWS_WITH(f.barrier.arrive(qkv, 1),
                    doctest::Contains("qkv_proj.weight': shard 1 (k_proj) arrived twice"));
  CHECK_THROWS_WITH(f.barrier.arrive(qkv, 7),
                    doctest::Contains("qkv_proj.weight': shard 7 is past the 3 expected"));
  CHECK_THROWS_WITH(f.barrier.arrive("nope", 0),
                    doctest::Contains("parameter 'nope': shard 0: unknown parameter"));
  std::error_code ec;
  f.barrier.arrive(qkv, 1, ec);
  CHECK(ec == sl::errc::duplicate_shard);
}

TEST_CASE("shard_barrier: bad declarations are refused") {
  fixture f;
  CHECK(thrown_code([&] { f.barrier.expect(qkv, 3); }) == sl::errc::invalid_argument);
  CHECK(thrown_code([&] { f.barrier.expect("zero", 0); }) == sl::errc::invalid_argument);
  CHECK(thrown_code([&] { f.barrier.expect("names", 2, {"a"}); }) == sl::errc::invalid_argument);
  CHECK_THROWS_WITH(f.barrier.expect(qkv, 3), doctest::Contains("qkv_proj.weight': declared twice"));
  CHECK_THROWS_WITH(f.barrier.expect("zero", 0),
                    doctest::Contains("parameter 'zero': expects zero shards"));
  CHECK_THROWS_WITH(f.barrier.expect("names", 2, {"a"}),
                    doctest::Contains("parameter 'names': 1 shard names for 2 shards"));
  CHECK(f.barrier.size() == 1);
}

TEST_CASE("shard_barrier: a timeout says exactly which shards are missing") {
  fixture f;
  f.barrier.arrive(qkv, 0);
  std::optional<std::error_code> result;
  f.barrier.async_wait(qkv, 20ms, [&result](std::error_code ec) { result = ec; });
  f.io.run();
  REQUIRE(result);
  CHECK(*result == sl::errc::shard_timeout);
  CHECK(f.barrier.describe_missing(qkv) ==
        "parameter '" + qkv + "': missing shards 1 (k_proj), 2 (v_proj) of 3");
  CHECK(f.barrier.missing(qkv) == std::vector<std::size_t>{1, 2});
}

TEST_CASE("shard_barrier: waiting on an unknown parameter fails at once") {
  fixture f;
  std::optional<std::error_code> result;
  f.barrier.async_wait("nope", 10s, [&result](std::error_code ec) { result = ec; });
  f.io.run();
  CHECK(result == std::optional<std::error_code>(sl::errc::unknown_parameter));
}

TEST_CASE("shard_barrier: cancellation, cancel(), fail() and reset() wake every waiter") {
  fixture f;
  asio::cancellation_signal signal;
  std::vector<std::error_code> results;
  auto record = [&results](std::error_code ec) { results.push_back(ec); };
  f.barrier.async_wait(qkv, 10s, asio::bind_cancellation_slot(signal.slot(), record));
  f.barrier.async_wait(qkv, 10s, record);
  run_ready(f.io);
  signal.emit(asio::cancellation_type::terminal);
  run_ready(f.io);
  REQUIRE(results.size() == 1);
  CHECK(results[0] == asio::error::operation_aborted);
  f.barrier.fail(qkv, sl::errc::loader_failed);
  run_ready(f.io);
  REQUIRE(results.size() == 2);
  CHECK(results[1] == sl::errc::loader_failed);
  f.barrier.async_wait(qkv, 10s, record);  // the failure sticks until reset()
  run_ready(f.io);
  CHECK(results.back() == sl::errc::loader_failed);
  f.barrier.reset();
  f.barrier.async_wait(qkv, 10s, record);
  f.barrier.async_wait(qkv, 10s, record);
  run_ready(f.io);
  f.barrier.cancel();
  run_ready(f.io);
  REQUIRE(results.size() == 5);
  CHECK(results[3] == asio::error::operation_aborted);
  CHECK(results[4] == asio::error::operation_aborted);
  // After reset() the arrivals start over.
  f.barrier.arrive(qkv, 0);
  CHECK(f.barrier.missing(qkv).size() == 2);
}

TEST_CASE("shard_barrier: works with use_future, deferred and use_awaitable") {
  fixture f;
  auto future = f.barrier.async_wait(qkv, 10s, asio::use_future);
  std::optional<std::error_code> deferred_result;
  auto op = f.barrier.async_wait(qkv, 10s, asio::experimental::deferred);
  std::move(op)([&deferred_result](std::error_code ec) { deferred_result = ec; });
  auto coroutine = [](sl::shard_barrier& b) -> asio::awaitable<void> {
    co_await b.async_wait(qkv, std::chrono::seconds(10), asio::use_awaitable);
  };
  auto awaited = asio::co_spawn(f.io, coroutine(f.barrier), asio::use_future);
  run_ready(f.io);
  for (std::size_t s = 0; s < 3; ++s) f.barrier.arrive(qkv, s);
  f.io.run();
  CHECK_NOTHROW(future.get());
  CHECK(deferred_result == std::optional<std::error_code>(std::error_code{}));
  CHECK_NOTHROW(awaited.get());
}

TEST_CASE("shard_barrier: partial and total cancellation abort a wait too") {
  for (auto type : {asio::cancellation_type::partial, asio::cancellation_type::total}) {
    fixture f;
    asio::cancellation_signal signal;
    std::optional<std::error_code> result;
    f.barrier.async_wait(qkv, 10s, asio::bind_cancellation_slot(signal.slot(),
                                       [&result](std::error_code ec) { result = ec; }));
    run_ready(f.io);
    CHECK(!result);
    signal.emit(type);
    run_ready(f.io);
    CHECK(result == std::optional<std::error_code>(asio::error::operation_aborted));
    // The aborted waiter left the list: completing the parameter later touches nothing.
    for (std::size_t s = 0; s < 3; ++s) f.barrier.arrive(qkv, s);
    run_ready(f.io);
  }
}

TEST_CASE("shard_barrier: destroying a barrier with pending waits aborts them") {
  asio::io_context io;
  std::vector<std::error_code> results;
  auto record = [&results](std::error_code ec) { results.push_back(ec); };
  {
    sl::shard_barrier barrier(io.get_executor());
    barrier.expect("w13", 4);
    barrier.async_wait("w13", std::chrono::seconds(10), record);
    barrier.async_wait("w13", std::chrono::seconds(10), record);
    run_ready(io);
    CHECK(results.empty());
  }
  io.run_for(std::chrono::seconds(5));  // bounded, in case a waiter were left behind
  REQUIRE(results.size() == 2);
  CHECK(results[0] == asio::error::operation_aborted);
  CHECK(results[1] == asio::error::operation_aborted);
}

TEST_CASE("shard_barrier: describe_missing without shard names, and for an unknown parameter") {
  asio::io_context io;
  sl::shard_barrier barrier(io.get_executor());
  barrier.expect("experts.w13", 4);
  barrier.arrive("experts.w13", 2);
  CHECK(barrier.describe_missing("experts.w13") ==
        "parameter 'experts.w13': missing shards 0, 1, 3 of 4");
  barrier.arrive("experts.w13", 0);
  barrier.arrive("experts.w13", 1);
  CHECK(barrier.describe_missing("experts.w13") == "parameter 'experts.w13': missing shard 3 of 4");
  CHECK(barrier.describe_missing("nope") == "parameter 'nope': unknown parameter");
  CHECK(!barrier.ready("nope"));
}
