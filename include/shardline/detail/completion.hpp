// Delivering a completion the Asio way: never inline from the initiating function,
// always through the handler's associated executor.
#pragma once

#include <asio/associated_executor.hpp>
#include <asio/experimental/append.hpp>
#include <asio/post.hpp>

#include <utility>

namespace shardline::detail {

/// Posts `handler(args...)` through `io_executor`, after which Asio hands it to the
/// handler's own associated executor. post() also keeps that executor's work count up
/// until the handler runs.
template <class IoExecutor, class Handler, class... Args>
void post_completion(const IoExecutor& io_executor, Handler&& handler, Args&&... args) {
  asio::post(io_executor, asio::experimental::append(std::forward<Handler>(handler),
                                                     std::forward<Args>(args)...));
}

}  // namespace shardline::detail
