// The poller behind cuda::async_wait's polled modes: one per execution context, it checks the
// context's pending waits with cudaEventQuery from a handler of that context.
#pragma once

#include <shardline/cuda/detail/handles.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/error.hpp>
#include <asio/execution_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace shardline::cuda::detail {

// How an adaptive poller trades a core for latency. The vocabulary is the verbs CQ poller's
// (busy: re-post while anything is pending; adaptive: busy for a while, then sleep), but the
// sleep differs: a CQ has a completion channel whose fd the reactor sleeps on, a CUDA event has
// nothing to sleep on but a blocking call, so the adaptive poller sleeps on a timer instead.
// The spin budget is time, not a count of empty polls: a poll's cost grows with the number of
// pending waits and with the other handlers it queues behind, while what the budget must cover
// is GPU work of a given duration (a shard's kernel, a bucket's copy: tens to hundreds of us).
struct poll_policy {
  // Busy polling goes on this long after the latest new wait or completion.
  std::chrono::microseconds spin{200};
  // Then the timer's period starts here and doubles at each empty poll, up to max_backoff: the
  // extra latency of a wait that outlasts the spin is at most max_backoff (plus timer slack),
  // and a context whose waits all outlast it wakes at most 1 / max_backoff times a second.
  std::chrono::microseconds first_backoff{25};
  std::chrono::microseconds max_backoff{100};
};

// A wait the poller watches: its op, type-erased. The poller owns the marker event (and, for a
// wait on an event, the stream that copies it) from watch() until it hands the wait back.
class polled_wait {
public:
  // The marked work is done (cudaSuccess) or the device failed (a sticky error). Called once,
  // with no lock held, on a thread of the poller's context; posts the completion.
  virtual void complete(cudaError_t status) = 0;
  // The context shuts down with the wait pending: destroy the op and its handler unrun.
  virtual void abandon() noexcept = 0;

protected:
  ~polled_wait() = default;

private:
  friend class event_poller;
  struct marker {
    int device = -1;
    cudaEvent_t event = nullptr;
    cudaStream_t stream = nullptr;  // a wait on an event only
  };
  marker marker_;
  bool busy_ = false;
};

// One per execution context (an asio service), not one per executor: the executors of a context
// (strands, the coroutines' any_io_executor) share its threads, so one pass of cudaEventQuery
// over all its waits and one timer cost less than a polling chain per executor. Any thread may
// call watch(); polls run on the executor of the wait that started the poller (the polling
// chain stops whenever nothing is pending), one poll at a time.
class event_poller final : public asio::execution_context::service {
public:
  static inline asio::execution_context::id id;

  explicit event_poller(asio::execution_context& context) : asio::execution_context::service(context) {}
  event_poller(const event_poller&) = delete;
  event_poller& operator=(const event_poller&) = delete;
  ~event_poller() override { release_pools(); }

  // Watches the work enqueued on `s` so far, polled on `ex`: busy while `busy` waits are
  // pending, else adaptively. On an error nothing is watched and the caller completes `w`.
  cudaError_t watch_stream(polled_wait& w, cudaStream_t s, bool busy, const asio::any_io_executor& ex) {
    int device = 0;
    cudaError_t e = cudaStreamGetDevice(s, &device);
    if (e == cudaSuccess) e = take_marker(device, false, w.marker_);
    if (e == cudaSuccess) e = cudaEventRecord(w.marker_.event, s);
    if (e != cudaSuccess) return give_up(w, e);
    start(w, busy, ex);
    return cudaSuccess;
  }

  // Watches the work `ev`'s latest record captured (an event of `device`). The event is copied
  // at once, by a stream of the poller's that waits for it and records a marker of its own:
  // recording `ev` again before the wait completes does not move what is waited for, and waits
  // for events of different streams never queue behind each other.
  cudaError_t watch_event(polled_wait& w, cudaEvent_t ev, int device, bool busy, const asio::any_io_executor& ex) {
    cudaError_t e = take_marker(device, true, w.marker_);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(w.marker_.stream, ev, 0);
    if (e == cudaSuccess) e = cudaEventRecord(w.marker_.event, w.marker_.stream);
    if (e != cudaSuccess) return give_up(w, e);
    start(w, busy, ex);
    return cudaSuccess;
  }

  // Test hooks: polls made so far, and the timer period now (zero while spinning or idle).
  std::uint64_t polls() const {
    const std::lock_guard lock(mutex_);
    return polls_;
  }
  std::chrono::microseconds backoff() const {
    const std::lock_guard lock(mutex_);
    return backoff_;
  }
  const poll_policy& policy() const noexcept { return policy_; }

private:
  using clock = std::chrono::steady_clock;
  using marker = polled_wait::marker;

  // Pooled per device: creating an event (and a stream) per wait costs microseconds.
  cudaError_t take_marker(int device, bool with_stream, marker& m) {
    {
      const std::lock_guard lock(mutex_);
      auto& pool = pool_of(device, with_stream);
      if (!pool.empty()) {
        m = pool.back();
        pool.pop_back();
        return cudaSuccess;
      }
    }
    const device_scope scope(device);
    cudaError_t e = scope.error();
    m = marker{device, nullptr, nullptr};
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&m.event, cudaEventDisableTiming);
    if (e == cudaSuccess && with_stream) e = cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking);
    return e;
  }

  // A marker whose work completed goes back to its pool; after an error it is destroyed (the
  // context may be lost, and a failed record leaves the event in no known state).
  void recycle(marker& m, bool reusable) {
    if (!m.event && !m.stream) return;
    if (reusable) {
      pool_of(m.device, m.stream != nullptr).push_back(m);
    } else {
      if (m.event) (void)cudaEventDestroy(m.event);
      if (m.stream) (void)cudaStreamDestroy(m.stream);
    }
    m = marker{};
  }

  std::vector<marker>& pool_of(int device, bool with_stream) {
    auto& pools = with_stream ? stream_markers_ : event_markers_;
    const auto index = static_cast<std::size_t>(std::max(device, 0));
    if (pools.size() <= index) pools.resize(index + 1);
    return pools[index];
  }

  cudaError_t give_up(polled_wait& w, cudaError_t e) {
    const std::lock_guard lock(mutex_);
    recycle(w.marker_, false);
    return e;
  }

  void start(polled_wait& w, bool busy, const asio::any_io_executor& ex) {
    const std::lock_guard lock(mutex_);
    w.busy_ = busy;
    busy_waits_ += busy ? 1 : 0;
    pending_.push_back(&w);
    spin_until_ = clock::now() + policy_.spin;
    backoff_ = std::chrono::microseconds::zero();
    if (!scheduled_) {
      scheduled_ = true;
      executor_ = ex;
      post_poll();
    } else if (timer_armed_) {
      // Sleeping: poll now. The aborted timer's handler is the poll.
      timer_->cancel();
    }
  }

  // With mutex_ held, scheduled_ set.
  void post_poll() {
    asio::post(*executor_, [this] { poll(); });
  }

  void poll() {
    // Local: once the next poll is scheduled, it may run on another thread while this one
    // still completes what it found.
    std::vector<std::pair<polled_wait*, cudaError_t>> finished;
    {
      const std::lock_guard lock(mutex_);
      timer_armed_ = false;
      if (shut_down_) return;
      ++polls_;
      bool any_done = false;
      std::erase_if(pending_, [&](polled_wait* w) {
        const cudaError_t status = cudaEventQuery(w->marker_.event);
        if (status == cudaErrorNotReady) return false;
        // A failed query's error may be the calling thread's last error too: clear it.
        if (status != cudaSuccess) (void)cudaGetLastError();
        recycle(w->marker_, status == cudaSuccess);
        busy_waits_ -= w->busy_ ? 1 : 0;
        finished.emplace_back(w, status);
        any_done = true;
        return true;
      });
      const auto now = clock::now();
      if (any_done) {
        spin_until_ = now + policy_.spin;
        backoff_ = std::chrono::microseconds::zero();
      }
      if (pending_.empty()) {
        scheduled_ = false;
        backoff_ = std::chrono::microseconds::zero();
      } else if (busy_waits_ > 0 || now < spin_until_) {
        post_poll();
      } else {
        backoff_ = backoff_ == std::chrono::microseconds::zero() ? policy_.first_backoff
                                                                 : std::min(2 * backoff_, policy_.max_backoff);
        if (!timer_) timer_.emplace(*executor_);
        timer_->expires_after(backoff_);
        timer_armed_ = true;
        timer_->async_wait([this](std::error_code) { poll(); });
      }
    }
    // Outside the lock: a completion may start a new wait at once (an inline executor).
    // Nothing can be reported from here: were the post's small allocation to fail, the
    // handler could never run.
    try {
      for (auto [w, status] : finished) w->complete(status);
    } catch (...) {
      std::terminate();
    }
  }

  void shutdown() override {
    std::vector<polled_wait*> abandoned;
    {
      const std::lock_guard lock(mutex_);
      shut_down_ = true;
      abandoned.swap(pending_);
      // The timer's service may be gone by our destructor: destroy the timer now (its handler,
      // if queued, is dropped with the context's other handlers).
      timer_.reset();
      timer_armed_ = false;
      for (polled_wait* w : abandoned) recycle(w->marker_, false);
    }
    for (polled_wait* w : abandoned) w->abandon();
  }

  void release_pools() noexcept {
    for (auto* pools : {&event_markers_, &stream_markers_})
      for (auto& pool : *pools)
        for (auto& m : pool) recycle(m, false);
  }

  mutable std::mutex mutex_;
  poll_policy policy_;
  std::vector<polled_wait*> pending_;
  std::vector<std::vector<marker>> event_markers_, stream_markers_;  // free, by device
  std::optional<asio::any_io_executor> executor_;
  std::optional<asio::steady_timer> timer_;
  clock::time_point spin_until_{};
  std::chrono::microseconds backoff_{0};
  std::uint64_t polls_ = 0;
  std::size_t busy_waits_ = 0;
  bool scheduled_ = false;
  bool timer_armed_ = false;
  bool shut_down_ = false;
};

}  // namespace shardline::cuda::detail
