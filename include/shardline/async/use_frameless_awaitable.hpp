// shardline/async/use_frameless_awaitable.hpp: a completion token for awaiting one operation
// from an asio::awaitable coroutine without a coroutine frame per operation.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/system_error.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/version.hpp>

#include <exception>
#include <optional>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>

/// `co_await op(args..., shardline::use_frameless_awaitable)` inside an
/// `asio::awaitable<T, Executor>` coroutine behaves as `asio::use_awaitable`:
///  - the result is the completion's values after a leading std::error_code or
///    std::exception_ptr: none (void), one (that value) or several (a std::tuple);
///  - a non-zero error_code is thrown as std::system_error (asio::system_error) carrying it,
///    a non-null exception_ptr is rethrown;
///  - per-operation cancellation: the operation's handler carries the coroutine's cancellation
///    slot, so cancelling the coroutine (co_spawn with bind_cancellation_slot, awaitable
///    operators) cancels the awaited operation as it would with use_awaitable;
///  - the completion runs on the coroutine's executor.
/// `asio::experimental::as_tuple(shardline::use_frameless_awaitable)` gives the whole
/// completion as a tuple and never throws.
///
/// Why: with Asio 1.22 each `co_await op(use_awaitable)` runs a small coroutine of its own
/// (async_result<use_awaitable_t>::initiate): its frame is allocated, the initiation and its
/// arguments are copied into it, it is pushed on the awaitable thread and popped and destroyed
/// on completion. Here the awaiting coroutine hands its awaitable thread to the operation's
/// handler itself and resumes from it, as use_awaitable's own per-operation coroutine does at
/// its single suspension point. Together with a transport typed on the coroutine's executor
/// (e.g. `basic_loopback_transport<asio::io_context::executor_type>` and coroutines of
/// `asio::awaitable<T, asio::io_context::executor_type>`, awaiting with
/// `shardline::use_frameless_awaitable_t<asio::io_context::executor_type>{}`), whose completion
/// then needs no second hop (detail::post_completion), it is the library's cheapest way to
/// await one operation; bench/op_overhead.cpp measures it.
///
/// Limits:
///  - The token names the coroutine's executor type, as use_awaitable_t does:
///    `use_frameless_awaitable` is for `asio::awaitable<T>` (any_io_executor),
///    `use_frameless_awaitable_t<Executor>{}` for `asio::awaitable<T, Executor>`.
///  - What it returns is only for `co_await` directly in such a coroutine: it is not a
///    coroutine, so it cannot be co_spawned or combined by awaitable operators (`||`, `&&`)
///    or parallel groups; wrap it in a coroutine, or use use_awaitable there.
///  - The initiation must not throw (Asio 1.22's use_awaitable mishandles that too): the
///    library's operations post their errors to the handler instead.
///  - It relies on asio::detail (awaitable_frame_base, awaitable_thread) as they are in Asio
///    1.22. For any other Asio version, or with SHARDLINE_NO_FRAMELESS_AWAITABLE defined,
///    `use_frameless_awaitable_t<Executor>` is `asio::use_awaitable_t<Executor>` and
///    `use_frameless_awaitable` is `asio::use_awaitable`: code written against it compiles and
///    behaves the same, only with use_awaitable's cost.
#if !defined(SHARDLINE_NO_FRAMELESS_AWAITABLE) && ASIO_VERSION >= 102200 && ASIO_VERSION < 102300
#define SHARDLINE_HAS_FRAMELESS_AWAITABLE 1
#else
#define SHARDLINE_HAS_FRAMELESS_AWAITABLE 0
#endif

namespace shardline {

#if SHARDLINE_HAS_FRAMELESS_AWAITABLE

/// The completion token type; see the top of this header.
template <class Executor = asio::any_io_executor>
struct use_frameless_awaitable_t {
  constexpr use_frameless_awaitable_t() noexcept = default;
};

/// The completion token for coroutines of `asio::awaitable<T>` (any_io_executor).
inline constexpr use_frameless_awaitable_t<> use_frameless_awaitable{};

namespace detail {

// The value an awaited completion yields: nothing, one value, or a tuple of several.
template <class... Ts>
class awaited_values {
public:
  using value_type = std::tuple<Ts...>;
  template <class... A>
  void set(A&&... a) {
    value_.emplace(std::forward<A>(a)...);
  }
  value_type take() { return std::move(*value_); }

private:
  std::optional<value_type> value_;
};

template <class T>
class awaited_values<T> {
public:
  using value_type = T;
  template <class A>
  void set(A&& a) {
    value_.emplace(std::forward<A>(a));
  }
  value_type take() { return std::move(*value_); }

private:
  std::optional<T> value_;
};

template <>
class awaited_values<> {
public:
  using value_type = void;
  void set() noexcept {}
  void take() noexcept {}
};

// Where the handler leaves the completion until the coroutine resumes and takes it.
template <class... Args>
class awaited_result : public awaited_values<Args...> {
public:
  template <class... A>
  void complete(A&&... a) {
    this->set(std::forward<A>(a)...);
  }
  typename awaited_values<Args...>::value_type get() { return this->take(); }
};

template <class... Ts>
class awaited_result<std::error_code, Ts...> : public awaited_values<Ts...> {
public:
  template <class... A>
  void complete(const std::error_code& ec, A&&... a) {
    failure_ = ec;
    if (!ec) this->set(std::forward<A>(a)...);
  }
  typename awaited_values<Ts...>::value_type get() {
    if (failure_) throw asio::system_error(failure_);  // what use_awaitable throws
    return this->take();
  }

private:
  std::error_code failure_;
};

template <class... Ts>
class awaited_result<std::exception_ptr, Ts...> : public awaited_values<Ts...> {
public:
  template <class... A>
  void complete(std::exception_ptr e, A&&... a) {
    failure_ = std::move(e);
    if (!failure_) this->set(std::forward<A>(a)...);
  }
  typename awaited_values<Ts...>::value_type get() {
    if (failure_) std::rethrow_exception(std::exchange(failure_, nullptr));
    return this->take();
  }

private:
  std::exception_ptr failure_;
};

// The operation's handler: it owns the suspended coroutine's awaitable thread, so it carries
// the coroutine's executor and cancellation slot as its associated ones (awaitable_thread's
// executor_type / cancellation_slot_type), and destroying it without a call unwinds the
// coroutine as use_awaitable's handler would. Called, it stores the completion and resumes.
template <class Executor, class Result>
class frameless_resume_handler : public asio::detail::awaitable_thread<Executor> {
public:
  frameless_resume_handler(asio::detail::awaitable_frame_base<Executor>* frame, Result& result)
      : asio::detail::awaitable_thread<Executor>(std::move(*frame->detach_thread())),
        frame_(frame),
        result_(&result) {}
  frameless_resume_handler(frameless_resume_handler&&) noexcept = default;

  template <class... A>
  void operator()(A&&... a) {
    result_->complete(std::forward<A>(a)...);
    frame_->attach_thread(this);
    frame_->clear_cancellation_slot();
    this->pump();
  }

private:
  asio::detail::awaitable_frame_base<Executor>* frame_;
  Result* result_;
};

// The tag that selects the awaitable specialisation below: what the operation completes
// with, its initiation and the initiation's arguments.
template <class Result, class Initiation, class... InitArgs>
struct frameless_operation;

}  // namespace detail

#else  // !SHARDLINE_HAS_FRAMELESS_AWAITABLE

template <class Executor = asio::any_io_executor>
using use_frameless_awaitable_t = asio::use_awaitable_t<Executor>;

inline constexpr asio::use_awaitable_t<> use_frameless_awaitable{};

#endif

}  // namespace shardline

#if SHARDLINE_HAS_FRAMELESS_AWAITABLE

namespace asio {

/// What `op(args..., use_frameless_awaitable_t<Executor>{})` returns: the initiation and its
/// arguments, run once the awaiting coroutine is suspended (so a completion on another thread
/// cannot race with the suspension). Why a specialisation of awaitable: the awaitable frame's
/// await_transform accepts an awaitable<T, Executor> for any T and then uses its own
/// await_suspend and await_resume, which is how the result gets back to the coroutine; a
/// function object awaited through the frame's other hook (the one use_awaitable uses) can
/// only resume it with void.
template <class Executor, class Result, class Initiation, class... InitArgs>
class [[nodiscard]] awaitable<shardline::detail::frameless_operation<Result, Initiation, InitArgs...>, Executor> {
public:
  using value_type = decltype(std::declval<Result&>().get());
  using executor_type = Executor;

  template <class I, class... A>
  explicit awaitable(I&& initiation, A&&... args)
      : initiation_(std::forward<I>(initiation)), args_(std::forward<A>(args)...) {}
  awaitable(awaitable&&) = default;
  awaitable(const awaitable&) = delete;
  awaitable& operator=(const awaitable&) = delete;

  bool await_ready() const noexcept { return false; }

  template <class U>
  void await_suspend(detail::coroutine_handle<detail::awaitable_frame<U, Executor>> h) {
    std::apply(
        [this, &h](InitArgs&... args) {
          std::move(initiation_)(
              shardline::detail::frameless_resume_handler<Executor, Result>(&h.promise(), result_),
              std::move(args)...);
        },
        args_);
  }

  value_type await_resume() { return result_.get(); }

private:
  Initiation initiation_;
  std::tuple<InitArgs...> args_;
  Result result_;
};

template <class Executor, class R, class... Args>
class async_result<shardline::use_frameless_awaitable_t<Executor>, R(Args...)> {
public:
  using result_type = shardline::detail::awaited_result<std::decay_t<Args>...>;
  using handler_type = shardline::detail::frameless_resume_handler<Executor, result_type>;

  template <class Initiation, class... InitArgs>
  using return_type_for =
      awaitable<shardline::detail::frameless_operation<result_type, std::decay_t<Initiation>,
                                                       std::decay_t<InitArgs>...>,
                Executor>;

  template <class Initiation, class Token, class... InitArgs>
  static return_type_for<Initiation, InitArgs...> initiate(Initiation&& initiation, Token&&,
                                                          InitArgs&&... args) {
    return return_type_for<Initiation, InitArgs...>(std::forward<Initiation>(initiation),
                                                    std::forward<InitArgs>(args)...);
  }
};

}  // namespace asio

#endif
