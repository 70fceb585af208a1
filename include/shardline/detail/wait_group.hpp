// A count of spawned tasks that one coroutine can await reaching zero.
#pragma once

#include <asio/awaitable.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <cstddef>

namespace shardline::detail {

/// Single-threaded. The waiter sleeps on a timer that never expires by itself; done()
/// cancels it when the count reaches zero, so no handler type has to be erased.
class wait_group {
public:
  template <class Executor>
  explicit wait_group(const Executor& ex) : timer_(ex, asio::steady_timer::time_point::max()) {}

  void add(std::size_t n = 1) noexcept { count_ += n; }
  void done() noexcept {
    if (--count_ == 0) timer_.cancel();
  }
  std::size_t count() const noexcept { return count_; }

  /// Returns once the count is zero, or early when the awaiting coroutine is cancelled
  /// (the caller checks count() and its cancellation state).
  asio::awaitable<void> wait_once() {
    if (count_ == 0) co_return;
    timer_.expires_at(asio::steady_timer::time_point::max());
    co_await timer_.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
  }

private:
  asio::steady_timer timer_;
  std::size_t count_ = 0;
};

}  // namespace shardline::detail
