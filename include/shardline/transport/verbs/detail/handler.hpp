// shardline/transport/verbs/detail/handler.hpp: one type-erased completion handler per operation
// (never per work request), keeping its executor busy until it runs.
#pragma once

#include <shardline/detail/completion.hpp>

#include <asio/associated_executor.hpp>
#include <asio/executor_work_guard.hpp>

#include <memory>
#include <utility>

namespace shardline::verbs::detail {

template <class... Args>
class erased_handler {
public:
  virtual ~erased_handler() = default;
  /// Posts the handler with `args` through its associated executor; call once.
  virtual void complete(Args... args) = 0;
};

template <class Handler, class IoExecutor, class... Args>
class erased_handler_impl final : public erased_handler<Args...> {
public:
  erased_handler_impl(Handler h, const IoExecutor& io)
      : io_(io), handler_(std::move(h)), work_(asio::get_associated_executor(handler_, io_)) {}

  void complete(Args... args) override {
    auto h = std::move(handler_);
    work_.reset();  // post_completion's post keeps the executor busy from here
    shardline::detail::post_completion(io_, std::move(h), std::move(args)...);
  }

private:
  IoExecutor io_;
  Handler handler_;
  asio::executor_work_guard<asio::associated_executor_t<Handler, IoExecutor>> work_;
};

template <class... Args, class Handler, class IoExecutor>
std::unique_ptr<erased_handler<Args...>> erase_handler(Handler&& h, const IoExecutor& io) {
  return std::make_unique<erased_handler_impl<std::decay_t<Handler>, IoExecutor, Args...>>(
      std::forward<Handler>(h), io);
}

}  // namespace shardline::verbs::detail
