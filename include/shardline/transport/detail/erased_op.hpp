// shardline/transport/detail/erased_op.hpp: the one way a transport keeps a pending
// operation's handler while the operation waits in a queue (a write, a notice, a wait for a
// notice): type-erased, allocated with the handler's associated allocator, destroyed and
// deallocated before the upcall, as Asio's own operations are (wait_handler::do_complete).
#pragma once

#include <shardline/detail/completion.hpp>

#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/recycling_allocator.hpp>

#include <memory>
#include <new>
#include <type_traits>
#include <utility>

namespace shardline::detail {

/// What untemplated transport code sees of a pending operation. complete() consumes it
/// (the handler runs later, through its executor); destroy() drops the handler uncalled,
/// for when its owner goes away. A transport derives its own operation state from it.
template <class... Args>
class erased_op {
public:
  erased_op(const erased_op&) = delete;
  erased_op& operator=(const erased_op&) = delete;

  void complete(Args... args) { complete_(this, std::move(args)...); }
  void destroy() noexcept { destroy_(this); }

protected:
  using complete_fn = void (*)(erased_op*, Args...);
  using destroy_fn = void (*)(erased_op*) noexcept;
  erased_op(complete_fn c, destroy_fn d) noexcept : complete_(c), destroy_(d) {}
  ~erased_op() = default;

private:
  complete_fn complete_;
  destroy_fn destroy_;
};

struct op_deleter {
  template <class Op>
  void operator()(Op* op) const noexcept {
    op->destroy();
  }
};

/// An owned pending operation: destroying it drops the handler uncalled; release() it to
/// complete().
template <class Op>
using op_ptr = std::unique_ptr<Op, op_deleter>;

/// The handler and the state `Base` (an erased_op<Args...> or a class derived from it) in
/// one block from the handler's associated allocator (Asio's recycling one by default).
/// While pending it keeps both the handler's executor and the I/O executor busy.
template <class Base, class Handler, class IoExecutor, class... Args>
class handler_op final : public Base {
  using handler_executor = asio::associated_executor_t<Handler, IoExecutor>;
  using allocator_type = typename std::allocator_traits<
      asio::associated_allocator_t<Handler, asio::recycling_allocator<void>>>::template rebind_alloc<handler_op>;
  using traits = std::allocator_traits<allocator_type>;

public:
  static op_ptr<Base> create(Handler&& h, const IoExecutor& io) {
    allocator_type alloc(asio::get_associated_allocator(h, asio::recycling_allocator<void>()));
    handler_op* p = traits::allocate(alloc, 1);
    try {
      return op_ptr<Base>(::new (static_cast<void*>(p)) handler_op(std::move(h), io, alloc));
    } catch (...) {
      traits::deallocate(alloc, p, 1);
      throw;
    }
  }

private:
  handler_op(Handler&& h, const IoExecutor& io, const allocator_type& a)
      : Base(&do_complete, &do_destroy), alloc_(a), io_(io),
        handler_work_(asio::make_work_guard(asio::get_associated_executor(h, io))),
        io_work_(asio::make_work_guard(io)), handler_(std::move(h)) {}

  static void do_complete(erased_op<Args...>* base, Args... args) {
    auto* self = static_cast<handler_op*>(base);
    auto slot = asio::get_associated_cancellation_slot(self->handler_);
    if (slot.is_connected() && slot.has_handler()) slot.clear();
    // Everything the upcall needs leaves the block before it is freed, so the operation the
    // handler starts next can reuse the memory. The guards stay until post() holds the work.
    Handler handler(std::move(self->handler_));
    auto handler_work = std::move(self->handler_work_);
    auto io_work = std::move(self->io_work_);
    const IoExecutor io = self->io_;
    do_destroy(base);
    post_completion(io, std::move(handler), std::move(args)...);
  }

  static void do_destroy(erased_op<Args...>* base) noexcept {
    auto* self = static_cast<handler_op*>(base);
    allocator_type a(self->alloc_);
    self->~handler_op();
    traits::deallocate(a, self, 1);
  }

  allocator_type alloc_;
  IoExecutor io_;
  asio::executor_work_guard<handler_executor> handler_work_;
  asio::executor_work_guard<IoExecutor> io_work_;
  Handler handler_;
};

template <class Base, class... Args, class Handler, class IoExecutor>
op_ptr<Base> make_op_impl(erased_op<Args...>*, Handler&& h, const IoExecutor& io) {
  return handler_op<Base, std::decay_t<Handler>, IoExecutor, Args...>::create(std::move(h), io);
}

/// Stores `handler` for a pending operation of state `Base` (default: nothing but the
/// handler). Its completion signature is the erased_op<Args...> that Base derives from.
template <class Base, class Handler, class IoExecutor>
op_ptr<Base> make_op(Handler&& handler, const IoExecutor& io) {
  static_assert(!std::is_lvalue_reference_v<Handler>, "the operation takes the handler over");
  return make_op_impl<Base>(static_cast<Base*>(nullptr), std::move(handler), io);
}

/// Completes the operation `op` owns: it is freed now, its handler runs later.
template <class Op, class... Args>
void complete_op(op_ptr<Op> op, Args&&... args) {
  op.release()->complete(std::forward<Args>(args)...);
}

}  // namespace shardline::detail
