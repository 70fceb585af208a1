// Running a blocking callable on another executor (the loader's thread pool) and
// completing back on the caller's.
#pragma once

#include <shardline/detail/completion.hpp>

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/post.hpp>

#include <exception>
#include <utility>

namespace shardline::detail {

/// Runs `fn()` on `worker`; completes with void(std::exception_ptr) through the handler's
/// associated executor (defaulting to `io_executor`). Not cancellable: a running callable
/// is never interrupted.
template <class WorkerExecutor, class IoExecutor, class Function, class Token>
auto async_run_on(const WorkerExecutor& worker, const IoExecutor& io_executor, Function fn,
                  Token&& token) {
  return asio::async_initiate<Token, void(std::exception_ptr)>(
      [](auto handler, const WorkerExecutor& worker, const IoExecutor& io_executor,
         Function fn) {
        // The io_context must not run out of work while the callable runs elsewhere.
        auto work = asio::make_work_guard(asio::get_associated_executor(handler, io_executor));
        asio::post(worker, [handler = std::move(handler), work = std::move(work),
                            fn = std::move(fn), io_executor]() mutable {
          std::exception_ptr failure;
          try {
            fn();
          } catch (...) {
            failure = std::current_exception();
          }
          post_completion(io_executor, std::move(handler), failure);
          work.reset();
        });
      },
      token, worker, io_executor, std::move(fn));
}

}  // namespace shardline::detail
