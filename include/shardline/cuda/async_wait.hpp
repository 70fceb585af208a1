// shardline/cuda/async_wait.hpp: await GPU work from an io_context without blocking it.
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/detail/wait_op.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/stream.hpp>

#include <asio/async_result.hpp>
#include <asio/execution/executor.hpp>
#include <asio/is_executor.hpp>
#include <asio/system_executor.hpp>

#include <cuda_runtime_api.h>

#include <system_error>
#include <type_traits>
#include <utility>

namespace shardline::cuda {

namespace detail {

template <class IoExecutor>
class initiate_wait {
public:
  using executor_type = IoExecutor;
  explicit initiate_wait(const IoExecutor& io) : io_(io) {}
  executor_type get_executor() const noexcept { return io_; }

  template <class Handler>
  void operator()(Handler&& handler, cudaStream_t s) const {
    wait_op<std::decay_t<Handler>, IoExecutor>::start(std::forward<Handler>(handler), io_, s);
  }

  // An event is waited for on a stream of its own that waits for the event, created for this
  // wait and destroyed at once (its work still runs): waits for events recorded on different
  // streams never queue behind each other.
  template <class Handler>
  void operator()(Handler&& handler, cudaEvent_t ev, int device) const {
    using op = wait_op<std::decay_t<Handler>, IoExecutor>;
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
  IoExecutor io_;
};

template <class T>
concept executor = asio::execution::is_executor<T>::value || asio::is_executor<T>::value;

}  // namespace detail

/// Completes once every piece of work enqueued on `stream` before the call is done; work
/// enqueued after the call is not waited for. Any thread may call it.
///
/// Completion signature: void(std::error_code). The handler runs on its associated executor
/// (for `co_await ...(asio::use_awaitable)`, the coroutine's), or on `ex` when it has none.
/// The io_context is never blocked: a stream callback (run by the CUDA runtime's own thread
/// once the work is done) posts the completion, and keeps the executor's work count up while
/// the GPU works. The callback holds up later work on `stream` only for that post.
/// Latency (bench/cuda_event_await.cpp, one H200, 2026-11-30): about 50-60 us from the last
/// kernel's end to the coroutine running, against about 5 us for a thread spinning in
/// cudaEventSynchronize or for cudaEventQuery polled on the io_context, both of which keep a
/// core busy; the runtime's callback thread wakes about as slowly as a blocking-sync wait
/// (40-50 us). Await GPU work that takes well over that, or poll where 50 us matter.
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
/// executor, before the handler is invoked. The executor's context must outlive the GPU work.
/// A handler whose executor runs work inline (use_future's) runs on the runtime's callback
/// thread, where it must not call CUDA.
template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, cudaStream_t stream, Token&& token) {
  return asio::async_initiate<Token, void(std::error_code)>(detail::initiate_wait<Executor>(ex), token, stream);
}

/// As above; a handler without an associated executor runs on asio::system_executor (as with
/// asio::post(token)): bind one (asio::bind_executor) or pass an executor.
template <class Token>
auto async_wait(cudaStream_t stream, Token&& token) {
  return async_wait(asio::system_executor(), stream, std::forward<Token>(token));
}

template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, const stream& s, Token&& token) {
  return async_wait(ex, s.native_handle(), std::forward<Token>(token));
}

template <class Token>
auto async_wait(const stream& s, Token&& token) {
  return async_wait(s.native_handle(), std::forward<Token>(token));
}

/// Completes once the work captured by `e`'s latest record() is done (at once for an event
/// never recorded), otherwise as async_wait(stream, token). Each wait creates and destroys a
/// stream of its own (a few microseconds): on hot paths, wait on the stream itself.
template <detail::executor Executor, class Token>
auto async_wait(const Executor& ex, const event& e, Token&& token) {
  return asio::async_initiate<Token, void(std::error_code)>(detail::initiate_wait<Executor>(ex), token,
                                                           e.native_handle(), e.device());
}

template <class Token>
auto async_wait(const event& e, Token&& token) {
  return async_wait(asio::system_executor(), e, std::forward<Token>(token));
}

}  // namespace shardline::cuda
