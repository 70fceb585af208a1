// The operation behind cuda::async_wait: a stream callback, or the context's event_poller,
// posts the completion to the handler's executor.
#pragma once

#include <shardline/cuda/detail/event_poller.hpp>
#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/execution/context.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/query.hpp>
#include <asio/post.hpp>
#include <asio/recycling_allocator.hpp>

#include <cuda_runtime_api.h>

#include <exception>
#include <type_traits>
#include <memory>
#include <new>
#include <system_error>
#include <utility>

namespace shardline::cuda::detail {

// Lives from the initiation to the upcall, in memory of the handler's associated allocator.
// CUDA holds a pointer to it until the callback ran, so it is freed only after that, on the
// handler's executor, and before the handler is invoked.
//
// The callback is cudaStreamAddCallback's rather than cudaLaunchHostFunc's: both run on the
// runtime's callback thread once the stream's earlier work is done, but after a device fault
// (a sticky error) a host function is never called, so the wait would hang, while a stream
// callback is called with the error. The callback calls no CUDA function: it posts.
//
// Polled, the op is watched by the event_poller of its handler's execution context, which
// completes it (complete()) from a poll once its marker event is done, or destroys it unrun
// (abandon()) when the context shuts down first.
template <class Handler, class IoExecutor>
class wait_op final : public polled_wait {
public:
  using executor_type = asio::associated_executor_t<Handler, IoExecutor>;
  using allocator_type = asio::associated_allocator_t<Handler, asio::recycling_allocator<void>>;

  // Waits for the work enqueued on `s` so far. Every outcome, a refusal to enqueue included,
  // reaches the handler through its executor, never inline and never as an exception.
  static void start(Handler handler, const IoExecutor& io, cudaStream_t s) {
    wait_op* op = create(std::move(handler), io);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing(s, &capture);
    // In a graph the callback would run once per replay, long after the op is gone.
    if (e == cudaSuccess && capture != cudaStreamCaptureStatusNone) e = cudaErrorStreamCaptureUnsupported;
    if (e == cudaSuccess) e = cudaStreamAddCallback(s, &on_stream_done, op, 0);
    if (e != cudaSuccess) op->fail(e);
  }

  // Waits for the work enqueued on `s` so far through the poller of the handler's execution
  // context (the handler's executor must be of the standard model), busy or adaptive.
  static void start_polled(Handler handler, const IoExecutor& io, cudaStream_t s, bool busy) {
    wait_op* op = create(std::move(handler), io);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing(s, &capture);
    // Recorded into a graph, the marker would complete at each replay, not now.
    if (e == cudaSuccess && capture != cudaStreamCaptureStatusNone) e = cudaErrorStreamCaptureUnsupported;
    if (e == cudaSuccess) {
      const asio::any_io_executor ex = op->poll_executor(io);
      e = poller_of(ex).watch_stream(*op, s, busy, ex);
    }
    if (e != cudaSuccess) op->fail(e);
  }

  // Waits for the work `ev`'s latest record captured through the poller, as start_polled.
  static void start_polled(Handler handler, const IoExecutor& io, cudaEvent_t ev, int device, bool busy) {
    wait_op* op = create(std::move(handler), io);
    const asio::any_io_executor ex = op->poll_executor(io);
    const cudaError_t e = poller_of(ex).watch_event(*op, ev, device, busy, ex);
    if (e != cudaSuccess) op->fail(e);
  }

  // Completes the handler with `e` (through its executor).
  static void fail(Handler handler, const IoExecutor& io, cudaError_t e) {
    create(std::move(handler), io)->fail(e);
  }

private:
  using op_allocator = typename std::allocator_traits<allocator_type>::template rebind_alloc<wait_op>;
  using op_traits = std::allocator_traits<op_allocator>;

  // Terminal cancellation only: the GPU work cannot be recalled, so the completion still
  // waits for it and then reports operation_aborted. Invoked on the handler's executor, as
  // finish() is: cancelled_ needs no synchronisation.
  class cancel_handler {
  public:
    explicit cancel_handler(wait_op* op) noexcept : op_(op) {}
    void operator()(asio::cancellation_type type) noexcept {
      if ((type & asio::cancellation_type::terminal) != asio::cancellation_type::none) op_->cancelled_ = true;
    }

  private:
    wait_op* op_;
  };

  // What the callback posts: runs finish(), or, dropped unrun (the executor shut down), frees
  // the op and the handler in it.
  class finisher {
  public:
    explicit finisher(wait_op* op) noexcept : op_(op) {}
    finisher(finisher&& o) noexcept : op_(std::exchange(o.op_, nullptr)) {}
    finisher& operator=(finisher&&) = delete;
    ~finisher() {
      if (op_) destroy(op_);
    }
    void operator()() { std::exchange(op_, nullptr)->finish(); }

  private:
    wait_op* op_;
  };

  wait_op(Handler&& handler, const IoExecutor& io)
      : handler_(std::move(handler)), work_(asio::get_associated_executor(handler_, io)) {
    auto slot = asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(this);
  }

  static wait_op* create(Handler&& handler, const IoExecutor& io) {
    op_allocator alloc(asio::get_associated_allocator(handler, asio::recycling_allocator<void>()));
    wait_op* p = op_traits::allocate(alloc, 1);
    try {
      return ::new (static_cast<void*>(p)) wait_op(std::move(handler), io);
    } catch (...) {
      op_traits::deallocate(alloc, p, 1);
      throw;
    }
  }

  op_allocator allocator() const noexcept {
    return op_allocator(asio::get_associated_allocator(handler_, asio::recycling_allocator<void>()));
  }

  static void destroy(wait_op* p) noexcept { destroy(p, p->allocator()); }
  static void destroy(wait_op* p, op_allocator alloc) noexcept {
    p->~wait_op();
    op_traits::deallocate(alloc, p, 1);
  }

  // Polls run on the handler's executor where it can take them (an io_context's, a strand, a
  // coroutine's), else on `io` (use_future's runs everything inline, on no context).
  asio::any_io_executor poll_executor(const IoExecutor& io) const {
    if constexpr (std::is_convertible_v<executor_type, asio::any_io_executor>)
      return work_.get_executor();
    else
      return io;
  }

  static event_poller& poller_of(const asio::any_io_executor& ex) {
    return asio::use_service<event_poller>(asio::query(ex, asio::execution::context));
  }

  void complete(cudaError_t status) override {
    result_ = status;
    post_finish();
  }

  void abandon() noexcept override { destroy(this); }

  static void CUDART_CB on_stream_done(cudaStream_t, cudaError_t status, void* self) noexcept {
    auto* op = static_cast<wait_op*>(self);
    op->result_ = status;
    // Nothing can be reported from here: were the post's small allocation to fail, the
    // handler could never run.
    try {
      op->post_finish();
    } catch (...) {
      std::terminate();
    }
  }

  void fail(cudaError_t e) {
    (void)cudaGetLastError();
    result_ = e;
    try {
      post_finish();
    } catch (...) {
      destroy(this);
      throw;
    }
  }

  // The post allocates with the default (recycling) allocator, not the handler's: it may run on
  // the runtime's callback thread, where a handler's allocator need not be usable.
  void post_finish() { asio::post(work_.get_executor(), finisher(this)); }

  // On the handler's executor.
  void finish() {
    auto slot = asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.clear();
    std::error_code ec;
    if (result_ != cudaSuccess)
      ec = make_error_code(result_);
    else if (cancelled_)
      ec = asio::error::operation_aborted;
    op_allocator alloc = allocator();
    Handler handler(std::move(handler_));
    destroy(this, alloc);
    std::move(handler)(ec);
  }

  Handler handler_;
  asio::executor_work_guard<executor_type> work_;
  cudaError_t result_ = cudaSuccess;
  bool cancelled_ = false;
};

}  // namespace shardline::cuda::detail
