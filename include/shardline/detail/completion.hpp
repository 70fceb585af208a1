// Delivering a completion the Asio way: never inline from the initiating function,
// always through the handler's associated executor.
#pragma once

#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/experimental/append.hpp>
#include <asio/post.hpp>

#include <tuple>
#include <type_traits>
#include <utility>

namespace shardline::detail {

/// A handler bound to its completion arguments, to be posted to the executor that is already
/// the handler's own. It has no associated executor on purpose: asio::post then runs it
/// straight from the queue instead of wrapping it in a work_dispatcher (a second hop that
/// counts work on, and dispatches to, the handler's executor). It keeps the handler's
/// allocator, which allocates the posted operation, and its cancellation slot. Move-only: the
/// handler is moved along, never copied.
template <class Handler, class... Args>
class bound_completion {
public:
  using allocator_type = asio::associated_allocator_t<Handler>;
  using cancellation_slot_type = asio::associated_cancellation_slot_t<Handler>;

  template <class H, class... A>
  explicit bound_completion(H&& handler, A&&... args)
      : handler_(std::forward<H>(handler)), args_(std::forward<A>(args)...) {}
  bound_completion(bound_completion&&) = default;
  bound_completion(const bound_completion&) = delete;
  bound_completion& operator=(const bound_completion&) = delete;

  allocator_type get_allocator() const noexcept { return asio::get_associated_allocator(handler_); }
  cancellation_slot_type get_cancellation_slot() const noexcept {
    return asio::get_associated_cancellation_slot(handler_);
  }

  void operator()() {
    std::apply([this](Args&... args) { std::move(handler_)(std::move(args)...); }, args_);
  }

private:
  Handler handler_;
  std::tuple<Args...> args_;
};

/// Posts `handler(args...)` so that it runs on the handler's associated executor (defaulting
/// to `io_executor`), never inline from the caller.
///
/// Same-executor fast path: when that associated executor has the type of `io_executor` and
/// compares equal to it (a coroutine awaiting an operation of a transport typed on its own
/// executor), the handler is posted to `io_executor` directly, as a bound_completion.
/// Correct because executors that compare equal are interchangeable (a function submitted to
/// one has the effects of submitting it to the other), so the handler still runs on its own
/// executor, strand or not; and the posted function is outstanding work of that executor's
/// context until it runs, which is all the work_dispatcher's tracked executor would add.
/// Otherwise asio::post(io_executor, ...) hands the handler on to its own executor through a
/// work_dispatcher, which keeps that executor's work count up until the handler runs.
template <class IoExecutor, class Handler, class... Args>
void post_completion(const IoExecutor& io_executor, Handler&& handler, Args&&... args) {
  using handler_type = std::decay_t<Handler>;
  if constexpr (std::is_same_v<asio::associated_executor_t<handler_type, IoExecutor>, IoExecutor>) {
    if (asio::get_associated_executor(handler, io_executor) == io_executor) {
      asio::post(io_executor, bound_completion<handler_type, std::decay_t<Args>...>(
                                  std::forward<Handler>(handler), std::forward<Args>(args)...));
      return;
    }
  }
  asio::post(io_executor, asio::experimental::append(std::forward<Handler>(handler),
                                                     std::forward<Args>(args)...));
}

}  // namespace shardline::detail
