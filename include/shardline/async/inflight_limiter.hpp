// shardline/async/inflight_limiter.hpp: bounds outstanding writes and bytes (or buckets), so
// producers wait instead of queueing without limit.
#pragma once

#include <shardline/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/cancellation_state.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>

#include <cstddef>
#include <list>
#include <memory>
#include <string>

namespace shardline {

struct inflight_limits {
  std::size_t max_operations = 64;               ///< e.g. outstanding write batches
  std::size_t max_bytes = std::size_t(1) << 30;  ///< bytes those operations carry
};

/// A two-dimensional counting semaphore with FIFO grants: a large request is never
/// starved by a stream of small ones.
///
/// Thread safety: distinct objects safe, shared objects unsafe: use from the executor's
/// thread.
template <class Executor = asio::any_io_executor>
class basic_inflight_limiter {
  // A queued request sleeps on a timer that never expires; a grant or cancel() wakes it.
  struct waiter {
    explicit waiter(const Executor& ex) : timer(ex, asio::steady_timer::time_point::max()) {}
    asio::steady_timer timer;
    std::size_t operations = 0, bytes = 0;
    std::error_code wake_reason;
    bool woken = false;
  };

public:
  using executor_type = Executor;

  basic_inflight_limiter(const executor_type& ex, inflight_limits limits)
      : executor_(ex), limits_(limits) {}
  ~basic_inflight_limiter() { cancel(); }
  basic_inflight_limiter(const basic_inflight_limiter&) = delete;
  basic_inflight_limiter& operator=(const basic_inflight_limiter&) = delete;

  executor_type get_executor() const noexcept { return executor_; }

  /// Takes `operations` and `bytes` of capacity, waiting in line until they are free.
  /// Completion signature void(std::error_code), never invoked from inside this call:
  /// errc::request_too_large when the request exceeds the whole capacity (it could never
  /// be granted; describe_request() gives the message); asio::error::operation_aborted on cancel(), destruction or per-operation
  /// cancellation (any type): nothing is taken then.
  template <class Token>
  auto async_acquire(std::size_t operations, std::size_t bytes, Token&& token) {
    return asio::async_compose<Token, void(std::error_code)>(
        acquire_op{this, operations, bytes}, token, executor_);
  }

  /// Takes the capacity now if it is free and nobody is waiting in line.
  bool try_acquire(std::size_t operations, std::size_t bytes) noexcept {
    if (!queue_.empty() || !fits(operations, bytes)) return false;
    operations_ += operations;
    bytes_ += bytes;
    return true;
  }

  /// Gives capacity back and grants waiting requests in order.
  void release(std::size_t operations, std::size_t bytes) noexcept {
    operations_ -= std::min(operations, operations_);
    bytes_ -= std::min(bytes, bytes_);
    while (!queue_.empty() && fits(queue_.front()->operations, queue_.front()->bytes)) {
      waiter* w = queue_.front();
      queue_.pop_front();
      operations_ += w->operations;
      bytes_ += w->bytes;
      w->woken = true;
      w->wake_reason = {};
      w->timer.cancel();
    }
  }

  /// Every queued request completes with operation_aborted.
  void cancel() {
    for (waiter* w : queue_) {
      w->woken = true;
      w->wake_reason = asio::error::operation_aborted;
      w->timer.cancel();
    }
    queue_.clear();
  }

  /// True when a request could never be granted (errc::request_too_large).
  bool too_large(std::size_t operations, std::size_t bytes) const noexcept {
    return operations > limits_.max_operations || bytes > limits_.max_bytes;
  }

  /// The message for errc::request_too_large, naming the limit the request exceeds, e.g.
  /// "request of 1 operations, 2048 bytes exceeds max_bytes = 1024".
  std::string describe_request(std::size_t operations, std::size_t bytes) const {
    std::string s = "request of " + std::to_string(operations) + " operations, " +
                    std::to_string(bytes) + " bytes ";
    if (operations > limits_.max_operations)
      return s + "exceeds max_operations = " + std::to_string(limits_.max_operations);
    if (bytes > limits_.max_bytes) return s + "exceeds max_bytes = " + std::to_string(limits_.max_bytes);
    return s + "fits the limits";
  }

  std::size_t operations_in_use() const noexcept { return operations_; }
  std::size_t bytes_in_use() const noexcept { return bytes_; }
  std::size_t waiting() const noexcept { return queue_.size(); }
  const inflight_limits& limits() const noexcept { return limits_; }

private:
  bool fits(std::size_t operations, std::size_t bytes) const noexcept {
    return operations <= limits_.max_operations - operations_ && bytes <= limits_.max_bytes - bytes_;
  }

  struct acquire_op {
    basic_inflight_limiter* self;
    std::size_t operations, bytes;
    std::unique_ptr<waiter> queued{};
    std::error_code result{};
    enum { start, posted, queued_up } step = start;

    template <class Self>
    void operator()(Self& op, std::error_code ec = {}) {
      switch (step) {
        case start:
          if (self->too_large(operations, bytes)) {
            result = make_error_code(errc::request_too_large);
          } else if (!self->try_acquire(operations, bytes)) {
            // Leaving the line takes nothing, so every cancellation type is safe to honour.
            op.reset_cancellation_state(asio::enable_total_cancellation());
            queued = std::make_unique<waiter>(self->executor_);
            queued->operations = operations;
            queued->bytes = bytes;
            self->queue_.push_back(queued.get());
            step = queued_up;
            queued->timer.async_wait(std::move(op));
            return;
          }
          step = posted;
          asio::post(self->executor_, std::move(op));
          return;
        case posted:
          break;
        case queued_up:
          if (queued->woken) {
            result = queued->wake_reason;
          } else {
            // Cancelled through the slot while still in line: leave the line, take nothing,
            // and let the requests behind it try again.
            (void)ec;
            self->queue_.remove(queued.get());
            self->release(0, 0);
            result = asio::error::operation_aborted;
          }
          break;
      }
      queued.reset();
      op.complete(result);
    }
  };

  executor_type executor_;
  inflight_limits limits_;
  std::size_t operations_ = 0, bytes_ = 0;
  std::list<waiter*> queue_;
};

using inflight_limiter = basic_inflight_limiter<>;

}  // namespace shardline
