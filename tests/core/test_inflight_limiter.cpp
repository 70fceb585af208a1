#include <shardline/async/inflight_limiter.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <optional>
#include <vector>

namespace sl = shardline;

// poll() leaves the context stopped once it runs out of work: restart it each time.
static void run_ready(asio::io_context& io) {
  io.restart();
  io.poll();
}

TEST_CASE("inflight_limiter: a request waits until capacity is released (back-pressure)") {
  asio::io_context io;
  sl::inflight_limiter limiter(io.get_executor(), {2, 100});
  std::vector<int> granted;
  limiter.async_acquire(1, 60, [&granted](std::error_code ec) { granted.push_back(ec ? -1 : 1); });
  limiter.async_acquire(1, 60, [&granted](std::error_code ec) { granted.push_back(ec ? -1 : 2); });
  CHECK(granted.empty());  // never granted from inside the call
  run_ready(io);
  CHECK(granted == std::vector<int>{1});
  CHECK(limiter.bytes_in_use() == 60);
  limiter.release(1, 60);
  run_ready(io);
  CHECK(granted == std::vector<int>{1, 2});
  CHECK(limiter.operations_in_use() == 1);
}

TEST_CASE("inflight_limiter: grants are first come, first served") {
  asio::io_context io;
  sl::inflight_limiter limiter(io.get_executor(), {10, 100});
  REQUIRE(limiter.try_acquire(1, 90));
  std::vector<int> order;
  limiter.async_acquire(1, 50, [&order](std::error_code) { order.push_back(1); });  // big, first
  limiter.async_acquire(1, 5, [&order](std::error_code) { order.push_back(2); });   // small, later
  run_ready(io);
  CHECK(order.empty());  // the small one does not jump the line
  CHECK(!limiter.try_acquire(1, 1));
  limiter.release(1, 90);
  run_ready(io);
  CHECK(order == std::vector<int>{1, 2});
}

TEST_CASE("inflight_limiter: a request bigger than the whole capacity fails, never hangs") {
  asio::io_context io;
  sl::inflight_limiter limiter(io.get_executor(), {4, 100});
  std::optional<std::error_code> a, b;
  limiter.async_acquire(1, 101, [&a](std::error_code ec) { a = ec; });
  limiter.async_acquire(5, 1, [&b](std::error_code ec) { b = ec; });
  io.run();
  CHECK(a == std::optional<std::error_code>(sl::errc::request_too_large));
  CHECK(b == std::optional<std::error_code>(sl::errc::request_too_large));
  CHECK(limiter.bytes_in_use() == 0);
  CHECK(limiter.too_large(1, 101));
  CHECK(!limiter.too_large(4, 100));
  CHECK(limiter.describe_request(1, 101) == "request of 1 operations, 101 bytes exceeds max_bytes = 100");
  CHECK(limiter.describe_request(5, 1) == "request of 5 operations, 1 bytes exceeds max_operations = 4");
}

TEST_CASE("inflight_limiter: cancellation takes nothing and lets the line move on") {
  asio::io_context io;
  sl::inflight_limiter limiter(io.get_executor(), {1, 100});
  REQUIRE(limiter.try_acquire(1, 10));
  asio::cancellation_signal signal;
  std::optional<std::error_code> first, second;
  limiter.async_acquire(1, 10, asio::bind_cancellation_slot(
                                   signal.slot(), [&first](std::error_code ec) { first = ec; }));
  limiter.async_acquire(1, 10, [&second](std::error_code ec) { second = ec; });
  run_ready(io);
  signal.emit(asio::cancellation_type::terminal);
  run_ready(io);
  CHECK(first == std::optional<std::error_code>(asio::error::operation_aborted));
  CHECK(!second);
  limiter.release(1, 10);
  run_ready(io);
  CHECK(second == std::optional<std::error_code>(std::error_code{}));
  CHECK(limiter.operations_in_use() == 1);
  std::optional<std::error_code> third;
  limiter.async_acquire(1, 10, [&third](std::error_code ec) { third = ec; });
  run_ready(io);
  limiter.cancel();
  run_ready(io);
  CHECK(third == std::optional<std::error_code>(asio::error::operation_aborted));
  CHECK(limiter.operations_in_use() == 1);
}

TEST_CASE("inflight_limiter: works with use_future, deferred and use_awaitable") {
  asio::io_context io;
  sl::inflight_limiter limiter(io.get_executor(), {3, 30});
  auto future = limiter.async_acquire(1, 10, asio::use_future);
  std::optional<std::error_code> deferred_result;
  auto op = limiter.async_acquire(1, 10, asio::experimental::deferred);
  std::move(op)([&deferred_result](std::error_code ec) { deferred_result = ec; });
  auto coroutine = [](sl::inflight_limiter& l) -> asio::awaitable<void> {
    co_await l.async_acquire(1, 10, asio::use_awaitable);
  };
  auto awaited = asio::co_spawn(io, coroutine(limiter), asio::use_future);
  io.run();
  CHECK_NOTHROW(future.get());
  CHECK(deferred_result == std::optional<std::error_code>(std::error_code{}));
  CHECK_NOTHROW(awaited.get());
  CHECK(limiter.operations_in_use() == 3);
  CHECK(limiter.bytes_in_use() == 30);
}

TEST_CASE("inflight_limiter: partial and total cancellation leave the line too") {
  for (auto type : {asio::cancellation_type::partial, asio::cancellation_type::total}) {
    asio::io_context io;
    sl::inflight_limiter limiter(io.get_executor(), {1, 100});
    REQUIRE(limiter.try_acquire(1, 1));
    asio::cancellation_signal signal;
    std::optional<std::error_code> result;
    limiter.async_acquire(1, 1, asio::bind_cancellation_slot(
                                    signal.slot(), [&result](std::error_code ec) { result = ec; }));
    run_ready(io);
    CHECK(limiter.waiting() == 1);
    signal.emit(type);
    run_ready(io);
    CHECK(result == std::optional<std::error_code>(asio::error::operation_aborted));
    CHECK(limiter.waiting() == 0);
    CHECK(limiter.operations_in_use() == 1);
  }
}

TEST_CASE("inflight_limiter: destroying a limiter with queued requests aborts them") {
  asio::io_context io;
  std::optional<std::error_code> result;
  {
    sl::inflight_limiter limiter(io.get_executor(), {1, 100});
    REQUIRE(limiter.try_acquire(1, 1));
    limiter.async_acquire(1, 1, [&result](std::error_code ec) { result = ec; });
    run_ready(io);
    CHECK(!result);
  }
  io.run_for(std::chrono::seconds(5));  // bounded, in case a request were left behind
  CHECK(result == std::optional<std::error_code>(asio::error::operation_aborted));
}
