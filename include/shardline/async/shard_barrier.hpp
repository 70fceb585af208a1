// shardline/async/shard_barrier.hpp: the per-parameter shard barrier. A fused parameter
// (q/k/v -> qkv_proj, experts -> w13) may be sent only once every shard is loaded.
#pragma once

#include <shardline/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/cancellation_state.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>

#include <chrono>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace shardline {

/// Counts the shards of each destination parameter and lets tasks await completeness.
///
/// Thread safety: distinct objects safe, shared objects unsafe: use from the executor's
/// thread.
template <class Executor = asio::any_io_executor>
class basic_shard_barrier {
  // A waiter sleeps on its own timer, which is also its timeout; arrive(), fail(),
  // cancel() and reset() wake it by cancelling the timer, and the op reads why from here.
  struct waiter {
    explicit waiter(const Executor& ex) : timer(ex) {}
    asio::steady_timer timer;
    std::error_code wake_reason = asio::error::operation_aborted;
    bool woken = false;
  };

  struct entry {
    std::vector<bool> arrived;
    std::size_t count = 0;
    std::vector<std::string> names;
    std::list<waiter*> waiters;
    std::error_code failure;
    bool complete() const noexcept { return count == arrived.size(); }
  };

public:
  using executor_type = Executor;

  explicit basic_shard_barrier(const executor_type& ex) : executor_(ex) {}
  ~basic_shard_barrier() { cancel(); }
  basic_shard_barrier(const basic_shard_barrier&) = delete;
  basic_shard_barrier& operator=(const basic_shard_barrier&) = delete;

  executor_type get_executor() const noexcept { return executor_; }

  /// Declares `parameter` with `shard_count` shards; `shard_names` (one per shard, or none)
  /// are used in messages. Throws shardline::error(errc::invalid_argument) naming the
  /// parameter on a zero count, a wrong number of names or a parameter declared twice.
  void expect(std::string parameter, std::size_t shard_count,
              std::vector<std::string> shard_names = {}) {
    auto invalid = [&](const std::string& why) {
      return error(make_error_code(errc::invalid_argument), "parameter '" + parameter + "': " + why);
    };
    if (shard_count == 0) throw invalid("expects zero shards");
    if (!shard_names.empty() && shard_names.size() != shard_count)
      throw invalid(std::to_string(shard_names.size()) + " shard names for " +
                    std::to_string(shard_count) + " shards");
    if (entries_.count(parameter)) throw invalid("declared twice");
    entry& e = entries_[parameter];
    e.arrived.assign(shard_count, false);
    e.names = std::move(shard_names);
  }

  /// Records shard `shard` of `parameter`. Throws shardline::error naming both:
  /// errc::unknown_parameter, errc::too_many_shards (index past the count) or
  /// errc::duplicate_shard.
  void arrive(std::string_view parameter, std::size_t shard) {
    std::error_code ec;
    arrive(parameter, shard, ec);
    if (!ec) return;
    std::string what = "parameter '" + std::string(parameter) + "': shard " + std::to_string(shard);
    auto it = entries_.find(parameter);
    if (it != entries_.end() && shard < it->second.names.size())
      what += " (" + it->second.names[shard] + ")";
    if (ec == errc::too_many_shards)
      what += " is past the " + std::to_string(it->second.arrived.size()) + " expected";
    else if (ec == errc::duplicate_shard)
      what += " arrived twice";
    else
      what += ": unknown parameter";
    throw error(ec, what);
  }

  void arrive(std::string_view parameter, std::size_t shard, std::error_code& ec) noexcept {
    ec.clear();
    auto it = entries_.find(parameter);
    if (it == entries_.end()) {
      ec = make_error_code(errc::unknown_parameter);
      return;
    }
    entry& e = it->second;
    if (shard >= e.arrived.size()) {
      ec = make_error_code(errc::too_many_shards);
      return;
    }
    if (e.arrived[shard]) {
      ec = make_error_code(errc::duplicate_shard);
      return;
    }
    e.arrived[shard] = true;
    if (++e.count == e.arrived.size()) wake(e, {});
  }

  /// True when every shard of `parameter` arrived (false for an unknown one).
  bool ready(std::string_view parameter) const {
    auto it = entries_.find(parameter);
    return it != entries_.end() && it->second.complete();
  }

  std::vector<std::size_t> missing(std::string_view parameter) const {
    std::vector<std::size_t> out;
    if (auto it = entries_.find(parameter); it != entries_.end())
      for (std::size_t i = 0; i < it->second.arrived.size(); ++i)
        if (!it->second.arrived[i]) out.push_back(i);
    return out;
  }

  /// e.g. "parameter 'l0.qkv_proj.weight': missing shards 1 (k_proj), 2 (v_proj) of 3".
  std::string describe_missing(std::string_view parameter) const {
    std::string s = "parameter '" + std::string(parameter) + "': ";
    auto it = entries_.find(parameter);
    if (it == entries_.end()) return s + "unknown parameter";
    const auto gaps = missing(parameter);
    if (gaps.empty()) return s + "no shard missing";
    s += gaps.size() == 1 ? "missing shard " : "missing shards ";
    for (std::size_t i = 0; i < gaps.size(); ++i) {
      if (i) s += ", ";
      s += std::to_string(gaps[i]);
      if (!it->second.names.empty()) s += " (" + it->second.names[gaps[i]] + ")";
    }
    return s + " of " + std::to_string(it->second.arrived.size());
  }

  /// Waits until every shard of `parameter` has arrived. Completion signature
  /// void(std::error_code), never invoked from inside this call:
  /// - success: all shards are in (at once when they already were);
  /// - errc::unknown_parameter: no such parameter;
  /// - errc::shard_timeout: `timeout` passed first (describe_missing() says what is missing);
  /// - the code given to fail(parameter, ec);
  /// - asio::error::operation_aborted: cancel(), reset(), destruction, or per-operation
  ///   cancellation (any type) through the handler's cancellation slot.
  template <class Token>
  auto async_wait(std::string_view parameter, std::chrono::steady_clock::duration timeout,
                  Token&& token) {
    return asio::async_compose<Token, void(std::error_code)>(
        wait_op{this, std::string(parameter), timeout}, token, executor_);
  }

  /// Wakes every waiter of `parameter` with `ec` (its loader failed, say); later waits on
  /// it complete with `ec` too, until reset().
  void fail(std::string_view parameter, std::error_code ec) {
    if (auto it = entries_.find(parameter); it != entries_.end()) {
      it->second.failure = ec;
      wake(it->second, ec);
    }
  }

  /// Every pending wait completes with operation_aborted.
  void cancel() {
    for (auto& [name, e] : entries_) wake(e, asio::error::operation_aborted);
  }

  /// Forgets every arrival and failure (the next weight version), keeps the declarations.
  /// Pending waits complete with operation_aborted.
  void reset() {
    for (auto& [name, e] : entries_) {
      wake(e, asio::error::operation_aborted);
      e.arrived.assign(e.arrived.size(), false);
      e.count = 0;
      e.failure.clear();
    }
  }

  std::size_t size() const noexcept { return entries_.size(); }

private:
  static void wake(entry& e, std::error_code reason) {
    for (waiter* w : e.waiters) {
      w->woken = true;
      w->wake_reason = reason;
      w->timer.cancel();
    }
    e.waiters.clear();
  }

  struct wait_op {
    basic_shard_barrier* self;
    std::string parameter;
    std::chrono::steady_clock::duration timeout;
    std::unique_ptr<waiter> sleeping{};
    std::error_code result{};
    enum { start, posted, slept } step = start;

    template <class Self>
    void operator()(Self& op, std::error_code ec = {}) {
      switch (step) {
        case start: {
          auto it = self->entries_.find(parameter);
          if (it == self->entries_.end()) {
            result = make_error_code(errc::unknown_parameter);
          } else if (it->second.failure) {
            result = it->second.failure;
          } else if (!it->second.complete()) {
            // The default filter passes terminal cancellation only; a wait is safe to
            // abandon at any level, so let partial and total through to the timer too.
            op.reset_cancellation_state(asio::enable_total_cancellation());
            sleeping = std::make_unique<waiter>(self->executor_);
            sleeping->timer.expires_after(timeout);
            it->second.waiters.push_back(sleeping.get());
            step = slept;
            sleeping->timer.async_wait(std::move(op));
            return;
          }
          step = posted;
          asio::post(self->executor_, std::move(op));
          return;
        }
        case posted:
          break;
        case slept:
          if (sleeping->woken) {
            result = sleeping->wake_reason;
          } else {
            // Not woken by the barrier: the timer expired, or this op was cancelled.
            if (auto it = self->entries_.find(parameter); it != self->entries_.end())
              it->second.waiters.remove(sleeping.get());
            result = ec ? std::error_code(asio::error::operation_aborted)
                        : make_error_code(errc::shard_timeout);
          }
          break;
      }
      sleeping.reset();
      op.complete(result);
    }
  };

  executor_type executor_;
  std::map<std::string, entry, std::less<>> entries_;
};

using shard_barrier = basic_shard_barrier<>;

}  // namespace shardline
