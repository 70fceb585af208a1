// A group of tasks spawned on one executor that one coroutine joins: a counter, the first
// failure, and a doorbell the last task rings (cppcoro's async_scope, on an Asio channel).
#pragma once

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/use_awaitable.hpp>

#include <cstddef>
#include <exception>
#include <system_error>
#include <utility>

namespace shardline::detail {

/// A one-slot doorbell: ring() never blocks and never queues more than one wake-up;
/// wait() returns after a ring (or early, when the waiting coroutine is cancelled: the
/// caller re-checks its condition and its cancellation state). Single-threaded.
template <class Executor>
class doorbell {
public:
  explicit doorbell(const Executor& ex) : channel_(ex, 1) {}
  void ring() noexcept { channel_.try_send(std::error_code{}, true); }
  asio::awaitable<void, Executor> wait() {
    co_await channel_.async_receive(asio::experimental::as_tuple(asio::use_awaitable_t<Executor>{}));
  }

private:
  // (void(error_code) alone is ambiguous among Asio 1.22's channel traits.)
  asio::experimental::channel<Executor, void(std::error_code, bool)> channel_;
};

/// Spawn, join, first error wins. Tasks are asio::awaitable<void>; an exception escaping one
/// is kept (the first only) and rethrown by rethrow_if_failed(). Single-threaded: spawn and
/// join from the executor's thread. The group must outlive its tasks: join() before it goes.
template <class Executor>
class task_group {
public:
  explicit task_group(const Executor& ex) : executor_(ex), idle_(ex) {}
  task_group(const task_group&) = delete;
  task_group& operator=(const task_group&) = delete;

  template <class Task>
  void spawn(Task task) {
    ++running_;
    asio::co_spawn(executor_, std::move(task), [this](std::exception_ptr e) {
      if (e && !failure_) failure_ = e;
      if (--running_ == 0) idle_.ring();
    });
  }

  std::size_t running() const noexcept { return running_; }
  bool failed() const noexcept { return failure_ != nullptr; }
  std::exception_ptr failure() const noexcept { return failure_; }

  /// Returns when no task runs any more, or early when the awaiting coroutine is cancelled.
  asio::awaitable<void, Executor> join_once() {
    if (running_ == 0) co_return;
    co_await idle_.wait();
  }

private:
  Executor executor_;
  doorbell<Executor> idle_;
  std::size_t running_ = 0;
  std::exception_ptr failure_;
};

}  // namespace shardline::detail
