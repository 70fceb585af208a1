// shardline/cuda/async_wait.hpp: await GPU work from an io_context without blocking it.
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/detail/wait_op.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/stream.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/execution/executor.hpp>
#include <asio/is_executor.hpp>
#include <asio/system_executor.hpp>

#include <cuda_runtime_api.h>

#include <system_error>
#include <type_traits>
#include <utility>

namespace shardline::cuda {

/// How cuda::async_wait learns that the GPU work is done.
/// - callback: a stream callback, run by the CUDA runtime's own thread once the work is done,
///   posts the completion. Costs no core while waiting, but the runtime's thread wakes slowly:
///   about 50 us from the kernel's end to the handler (bench/cuda_event_await.cpp, H200).
///   Right when nothing else keeps a core awake and waits are rare or long.
/// - busy: the work is marked with an event, and the execution context's poller checks its
///   pending events with cudaEventQuery from a handler it re-posts while any is pending:
///   about 5 us, and a core of the context busy for as long as anything is awaited.
/// - adaptive (the default): polls as busy for 200 us after the latest new wait or
///   completion, then from a steady_timer whose period doubles from 25 us to at most 100 us;
///   a new wait or a completion makes it busy again. Waits for work shorter than the spin
///   (a shard's kernel, a bucket's copy) complete as fast as busy; a wait that outlasts it
///   completes at most 100 us (plus the OS's timer slack) late, while the context wakes at
///   most 10,000 times a second. With nothing pending, no mode polls: run() can return.
/// Why polling is the default: the pipeline awaits GPU work per shard, tens of microseconds
/// each, from an io_context thread that is busy during an update anyway; 50 us per wait is what
/// kept bench/cuda_pipelined_fp8's per-shard loader under its goal, and cudaEventQuery on the
/// io_context is as fast as a thread spinning in cudaEventSynchronize (bench/RESULTS.md).
/// The modes share the verbs CQ poller's words (verbs::poll_mode) but not its type: a CQ's
/// third mode sleeps on the completion channel's fd, a CUDA event has nothing to sleep on, so
/// its third mode is a callback on another thread and its adaptive mode sleeps on a timer.
enum class wait_mode { callback, busy, adaptive };

/// The mode of the overloads that take none.
inline constexpr wait_mode default_wait_mode = wait_mode::adaptive;

namespace detail {

template <class IoExecutor>
class initiate_wait {
public:
  using executor_type = IoExecutor;
  initiate_wait(const IoExecutor& io, wait_mode mode) : io_(io), mode_(mode) {}
  executor_type get_executor() const noexcept { return io_; }

  template <class Handler>
  void operator()(Handler&& handler, cudaStream_t s) const {
    using op = wait_op<std::decay_t<Handler>, IoExecutor>;
    if constexpr (can_poll<Handler>) {
      if (mode_ != wait_mode::callback)
        return op::start_polled(std::forward<Handler>(handler), io_, s, mode_ == wait_mode::busy);
    }
    op::start(std::forward<Handler>(handler), io_, s);
  }

  // Callback mode: an event is waited for on a stream of its own that waits for the event,
  // created for this wait and destroyed at once (its work still runs): waits for events
  // recorded on different streams never queue behind each other. The poller does the same
  // with streams it keeps.
  template <class Handler>
  void operator()(Handler&& handler, cudaEvent_t ev, int device) const {
    using op = wait_op<std::decay_t<Handler>, IoExecutor>;
    if constexpr (can_poll<Handler>) {
      if (mode_ != wait_mode::callback)
        return op::start_polled(std::forward<Handler>(handler), io_, ev, device, mode_ == wait_mode::busy);
    }
    cudaStream_t s = nullptr;
    cudaError_t e;
    {
      device_scope scope(device);
      e = scope.error();
      if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    }
    if (e == cudaSuccess) e = cudaStreamWaitEvent(s, ev, 0);
    if (e != cudaSuccess) {
      if (s) (void)cudaStreamDestroy(s);
      return op::fail(std::forward<Handler>(handler), io_, e);
    }
    const stream_handle owned(s);
    op::start(std::forward<Handler>(handler), io_, s);
  }

private:
  // The poller runs on the handler's executor or, where that cannot take it, on `io_`: one
  // of them must be of the standard model (else the wait takes the callback).
  template <class Handler>
  static constexpr bool can_poll =
      std::is_convertible_v<asio::associated_executor_t<std::decay_t<Handler>, IoExecutor>, asio::any_io_executor> ||
      std::is_convertible_v<IoExecutor, asio::any_io_executor>;

  IoExecutor io_;
  wait_mode mode_;
};

template <class T>
concept executor = asio::execution::is_executor<T>::value || asio::is_executor<T>::value;

}  // namespace detail

/// Completes once every piece of work enqueued on `stream` before the call is done; work
/// enqueued after the call is not waited for. Any thread may call it.
///
/// Completion signature: void(std::error_code). The handler runs on its associated executor
/// (for `co_await ...(asio::use_awaitable)`, the coroutine's), or on `ex` when it has none.
/// The io_context is never blocked. `mode` (wait_mode above; default_wait_mode in the overloads
/// without one) says how the completion is found:
/// - callback: a stream callback (on the CUDA runtime's thread) posts it, and keeps the
///   executor's work count up while the GPU works; it holds up later work on `stream` only for
///   that post. The executor's context must outlive the GPU work.
/// - busy, adaptive: an event recorded on `stream` marks the work, and the poller of the
///   handler's executor's execution context (one per context) queries it from that context's
///   threads; the wait keeps the executor's work count up. Destroying the context with waits
///   pending destroys their handlers unrun (as Asio does with its own pending operations); the
///   GPU work still runs. A handler whose executor is of Asio's old executor model waits
///   through the callback.
/// Latency (bench/cuda_event_await.cpp, one H200): about 50 us from the last kernel's end to
/// the coroutine running for the callback, about 5 us polled (see wait_mode for the costs).
///
/// Errors, in cuda::error_category() (message: the CUDA text):
/// - the wait could not be enqueued: no GPU or driver (e.g. cudaErrorInsufficientDriver), a
///   destroyed stream, or a stream being captured into a graph
///   (cudaErrorStreamCaptureUnsupported: the completion would run at every replay);
/// - the device faulted before the work was done (a sticky error such as
///   cudaErrorIllegalAddress): the wait completes with it rather than hanging.
/// Failures of the enqueued work that leave the context usable (a kernel launched with a bad
/// configuration) are reported by the call that enqueued it, not here.
///
/// Per-operation cancellation: terminal only, and it cannot recall the GPU work. A cancelled
/// wait still completes only once the work is done, and then with
/// asio::error::operation_aborted, so memory the work uses stays alive until the handler runs.
/// Other cancellation types are ignored.
///
/// The op is allocated with the handler's associated allocator and freed, on the handler's
/// executor, before the handler is invoked. A handler whose executor runs work inline
/// (use_future's) runs on the thread that found the work done (the runtime's callback thread,
/// where it must not call CUDA, or a poller's).
template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, cudaStream_t stream, wait_mode mode, Token&& token) {
  return asio::async_initiate<Token, void(std::error_code)>(detail::initiate_wait<Executor>(ex, mode), token,
                                                           stream);
}

template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, cudaStream_t stream, Token&& token) {
  return async_wait(ex, stream, default_wait_mode, std::forward<Token>(token));
}

/// As above; a handler without an associated executor runs on asio::system_executor (as with
/// asio::post(token)): bind one (asio::bind_executor) or pass an executor.
template <class Token>
auto async_wait(cudaStream_t stream, wait_mode mode, Token&& token) {
  return async_wait(asio::system_executor(), stream, mode, std::forward<Token>(token));
}

template <class Token>
auto async_wait(cudaStream_t stream, Token&& token) {
  return async_wait(asio::system_executor(), stream, default_wait_mode, std::forward<Token>(token));
}

template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, const stream& s, wait_mode mode, Token&& token) {
  return async_wait(ex, s.native_handle(), mode, std::forward<Token>(token));
}

template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, const stream& s, Token&& token) {
  return async_wait(ex, s.native_handle(), default_wait_mode, std::forward<Token>(token));
}

template <class Token>
auto async_wait(const stream& s, wait_mode mode, Token&& token) {
  return async_wait(s.native_handle(), mode, std::forward<Token>(token));
}

template <class Token>
auto async_wait(const stream& s, Token&& token) {
  return async_wait(s.native_handle(), default_wait_mode, std::forward<Token>(token));
}

/// Completes once the work captured by `e`'s latest record() is done (at once for an event
/// never recorded); recording `e` again before the wait completes does not change what it
/// waits for. Otherwise as async_wait(stream, token). The callback mode creates and destroys a
/// stream per wait (a few microseconds); the polled modes reuse theirs (a stream waits for `e`
/// and records the poller's marker: two calls more than a wait on the stream itself).
template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, const event& e, wait_mode mode, Token&& token) {
  return asio::async_initiate<Token, void(std::error_code)>(detail::initiate_wait<Executor>(ex, mode), token,
                                                           e.native_handle(), e.device());
}

template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, const event& e, Token&& token) {
  return async_wait(ex, e, default_wait_mode, std::forward<Token>(token));
}

template <class Token>
auto async_wait(const event& e, wait_mode mode, Token&& token) {
  return async_wait(asio::system_executor(), e, mode, std::forward<Token>(token));
}

template <class Token>
auto async_wait(const event& e, Token&& token) {
  return async_wait(asio::system_executor(), e, default_wait_mode, std::forward<Token>(token));
}

}  // namespace shardline::cuda
