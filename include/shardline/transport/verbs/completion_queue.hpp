// shardline/transport/verbs/completion_queue.hpp: a completion channel + CQ, polled on an io_context.
#pragma once

#include <shardline/error.hpp>
#include <shardline/transport/verbs/detail/handles.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/options.hpp>

#include <asio/post.hpp>
#include <asio/posix/basic_stream_descriptor.hpp>
#include <asio/basic_waitable_timer.hpp>

#include <infiniband/verbs.h>

#include <fcntl.h>

#include <cerrno>
#include <chrono>
#include <memory>
#include <string>
#include <system_error>

namespace shardline::verbs {

/// What a completion_queue feeds: the owner of the operations whose WRs it completes.
class cq_consumer {
public:
  virtual void on_completion(const ibv_wc& wc) = 0;
  /// True while operations wait on this CQ: the poller runs only then, so an idle
  /// transport leaves the io_context free to return from run().
  virtual bool has_work() const noexcept = 0;
  /// Called after a poll that found completions (batching follow-up work, e.g. posting).
  virtual void after_drain() {}

protected:
  ~cq_consumer() = default;
};

/// A CQ with its own completion channel, polled on `Executor` without extra threads.
///
/// Event loop (event mode, and adaptive once its spin budget is spent):
/// req_notify -> drain -> async_wait(fd) -> ibv_get_cq_event + ack -> drain -> req_notify
/// -> drain ... A completion that lands between a drain and the re-arm is caught by the
/// drain after the arm, so none is missed; a steady_timer polls every `fallback_poll`
/// while work is outstanding in case an event is ever lost anyway.
/// Handlers hold only a weak_ptr to the consumer: destroying the consumer (which owns
/// this object) cancels everything and they find it gone.
/// Not thread safe: use from the executor's thread.
template <poll_mode Mode, class Executor>
class completion_queue {
public:
  completion_queue(const Executor& ex, device& dev, int entries, const options& opts)
      : descriptor_(ex), timer_(ex), fallback_(opts.fallback_poll), spin_limit_(opts.spin_polls) {
    channel_.reset(ibv_create_comp_channel(dev.context()));
    if (!channel_)
      throw error(std::error_code(errno, std::system_category()),
                  "verbs: ibv_create_comp_channel on " + dev.name() + " failed");
    const int flags = ::fcntl(channel_->fd, F_GETFL);
    if (flags < 0 || ::fcntl(channel_->fd, F_SETFL, flags | O_NONBLOCK) < 0)
      throw error(std::error_code(errno, std::system_category()),
                  "verbs: cannot make the completion channel non-blocking");
    cq_.reset(ibv_create_cq(dev.context(), entries, nullptr, channel_.get(), 0));
    if (!cq_)
      throw error(std::error_code(errno, std::system_category()),
                  "verbs: ibv_create_cq(" + std::to_string(entries) + " entries) on " +
                      dev.name() + " failed");
    descriptor_.assign(channel_->fd);
  }

  completion_queue(const completion_queue&) = delete;
  completion_queue& operator=(const completion_queue&) = delete;

  ~completion_queue() {
    std::error_code ignored;
    descriptor_.cancel(ignored);
    // The channel owns the fd: the descriptor must not close it.
    descriptor_.release();
    // Every event read was acknowledged at once, so ibv_destroy_cq cannot block on
    // unacknowledged events. cq_ (declared after channel_) is destroyed first.
  }

  ibv_cq* get() const noexcept { return cq_.get(); }
  int capacity() const noexcept { return cq_->cqe; }

  /// The consumer whose on_completion receives this CQ's work completions.
  void set_consumer(std::weak_ptr<cq_consumer> c, cq_consumer* raw) {
    owner_ = std::move(c);
    raw_ = raw;
  }

  /// Work appeared: make sure the CQ is being polled.
  void kick() {
    if (running_) return;
    running_ = true;
    spins_ = 0;
    if constexpr (Mode == poll_mode::event) arm_and_wait();
    else schedule_spin();
    start_timer();
  }

  /// Polls now (up to a bound), feeding the consumer. Returns the number of completions.
  std::size_t drain() {
    ibv_wc wcs[32];
    std::size_t total = 0;
    const std::size_t bound = 4u * static_cast<std::size_t>(cq_->cqe) + 32;
    while (total < bound) {
      const int n = ibv_poll_cq(cq_.get(), 32, wcs);
      if (n <= 0) break;
      for (int i = 0; i < n; ++i) raw_->on_completion(wcs[i]);
      total += static_cast<std::size_t>(n);
      if (n < 32) break;
    }
    if (total) raw_->after_drain();
    return total;
  }

private:
  void idle() {
    running_ = false;
    std::error_code ignored;
    if (wait_pending_) descriptor_.cancel(ignored);
    if (timer_pending_) timer_.cancel();
  }

  void schedule_spin() {
    if (spin_pending_) return;
    spin_pending_ = true;
    asio::post(descriptor_.get_executor(), [w = owner_, this] {
      auto keep = w.lock();
      if (!keep) return;
      spin_pending_ = false;
      if (running_) spin_step();
    });
  }

  void spin_step() {
    const std::size_t n = drain();
    if (!raw_->has_work()) return idle();
    if constexpr (Mode == poll_mode::busy) {
      schedule_spin();
    } else {
      spins_ = n ? 0 : spins_ + 1;
      if (spins_ < spin_limit_) schedule_spin();
      else arm_and_wait();
    }
  }

  void arm_and_wait() {
    ibv_req_notify_cq(cq_.get(), 0);
    const std::size_t n = drain();  // what landed before the arm took effect
    if (!raw_->has_work()) return idle();
    if (Mode == poll_mode::adaptive && n) {
      spins_ = 0;
      return schedule_spin();
    }
    if (wait_pending_) return;
    wait_pending_ = true;
    descriptor_.async_wait(asio::posix::descriptor_base::wait_read,
                           [w = owner_, this](std::error_code) {
                             auto keep = w.lock();
                             if (!keep) return;
                             wait_pending_ = false;
                             on_event();
                           });
  }

  void on_event() {
    // Consume every pending event and acknowledge each at once (ibv_destroy_cq waits
    // for the acknowledgements of every event read).
    void* ctx = nullptr;
    ibv_cq* ev_cq = nullptr;
    while (ibv_get_cq_event(channel_.get(), &ev_cq, &ctx) == 0) ibv_ack_cq_events(ev_cq, 1);
    if (!running_) return;
    if constexpr (Mode == poll_mode::adaptive) {
      drain();
      if (!raw_->has_work()) return idle();
      spins_ = 0;
      schedule_spin();
    } else {
      drain();
      arm_and_wait();
    }
  }

  void start_timer() {
    if (timer_pending_ || fallback_.count() <= 0) return;
    timer_pending_ = true;
    timer_.expires_after(fallback_);
    timer_.async_wait([w = owner_, this](std::error_code) {
      auto keep = w.lock();
      if (!keep) return;
      timer_pending_ = false;
      if (!running_) return;
      drain();
      if (!raw_->has_work()) return idle();
      start_timer();
    });
  }

  // channel_ before cq_: the CQ is destroyed first.
  detail::comp_channel_handle channel_;
  detail::cq_handle cq_;
  asio::posix::basic_stream_descriptor<Executor> descriptor_;
  asio::basic_waitable_timer<std::chrono::steady_clock,
                             asio::wait_traits<std::chrono::steady_clock>, Executor>
      timer_;
  std::chrono::milliseconds fallback_;
  unsigned spin_limit_;
  std::weak_ptr<cq_consumer> owner_;
  cq_consumer* raw_ = nullptr;
  unsigned spins_ = 0;
  bool running_ = false;
  bool wait_pending_ = false;
  bool timer_pending_ = false;
  bool spin_pending_ = false;
};

}  // namespace shardline::verbs
