// cuda_event_await: how long after a stream's last kernel ends the waiting code runs again,
// through cuda::async_wait (a coroutine on an io_context) against cudaEventSynchronize on a
// thread, in one run.
//
//   bench_cuda_event_await [--iterations N] [--warmup W] [--rounds R] [--json]
//
// Each iteration launches one single-thread kernel that spins on a word of mapped pinned
// memory. The waiter arms (launches, then starts waiting); a releaser thread gives the waiter
// 100 us to settle (the io_context's thread asleep in epoll, the blocking-sync thread asleep),
// reads the clock and sets the word; the kernel sees it within about a microsecond over PCIe
// and ends; the waiter reads the clock when it runs again. Latency = the waiter's clock minus
// the releaser's: the same kernel exit is in every variant, so differences are the wake-up
// paths. Variants, interleaved round by round:
//   async_wait <mode>     co_await cuda::async_wait(stream, mode, use_awaitable) on an
//                         io_context, for each cuda::wait_mode: callback (a stream callback
//                         posts), busy and adaptive (the io_context's event poller); the
//                         library default's is the JSON line cuda.event_await, each mode has
//                         its own line too (cuda.event_await_callback, _busy, _adaptive)
//   cudaEventSynchronize  the default event on a thread (the runtime spins or yields: the
//                         fastest a dedicated thread can be); the JSON baseline
//   ... blocking sync     a cudaEventBlockingSync event: the thread sleeps as the io_context does
//   cudaLaunchHostFunc    a host function posting to the io_context, resuming the coroutine:
//                         the mechanism async_wait does not use (it is never called after a
//                         device fault), for comparison
//   busy poll             cudaEventQuery between posts on the io_context: a core spent polling
// With no usable GPU it says so on stderr and exits 0 (so `bench/run all` goes on).
#include <shardline/cuda/async_wait.hpp>
#include <shardline/cuda/device.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/pinned_buffer.hpp>
#include <shardline/cuda/stream.hpp>

#include <asio/co_spawn.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <gpu_kernels.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace cuda = shardline::cuda;
using clock_type = std::chrono::steady_clock;

namespace {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count();
}

// The word the kernel spins on, the releaser that sets it, and the clock reading it set it at.
class release_line {
public:
  explicit release_line(int device)
      : memory_(2 * sizeof(std::uint32_t), device, cudaHostAllocMapped | cudaHostAllocPortable),
        releaser_([this] { run(); }) {
    words()[0] = 0;
    words()[1] = 0;
  }
  ~release_line() {
    stop_.store(true);
    releaser_.join();
  }

  // Before launching: the word is 0.
  void reset() { std::atomic_ref<std::uint32_t>(words()[0]).store(0, std::memory_order_release); }
  // After launching: release after the settle time.
  void arm() { armed_.fetch_add(1, std::memory_order_release); }
  // After waking: ns since the release.
  double latency_ns() {
    const std::uint64_t seq = armed_.load(std::memory_order_acquire);
    while (released_.load(std::memory_order_acquire) != seq) {
    }
    return static_cast<double>(now_ns() - release_ns_.load(std::memory_order_relaxed));
  }
  const volatile std::uint32_t* flag() { return words(); }
  std::uint32_t* timed_out() { return words() + 1; }

private:
  void run() {
    std::uint64_t seen = 0;
    while (!stop_.load(std::memory_order_relaxed)) {
      const std::uint64_t seq = armed_.load(std::memory_order_acquire);
      if (seq == seen) continue;
      seen = seq;
      const auto settle = clock_type::now() + std::chrono::microseconds(100);
      while (clock_type::now() < settle) {
      }
      release_ns_.store(now_ns(), std::memory_order_relaxed);
      released_.store(seq, std::memory_order_release);
      std::atomic_ref<std::uint32_t>(words()[0]).store(1, std::memory_order_release);
    }
  }
  std::uint32_t* words() { return reinterpret_cast<std::uint32_t*>(memory_.data()); }

  cuda::pinned_buffer memory_;
  std::atomic<std::uint64_t> armed_{0}, released_{0};
  std::atomic<std::int64_t> release_ns_{0};
  std::atomic<bool> stop_{false};
  std::thread releaser_;
};

void launch(release_line& line, cuda::stream& s) {
  line.reset();
  cuda::throw_if(gpu_test::spin_until(line.flag(), line.timed_out(), 1'000'000'000ull, s.native_handle()),
                 "spin_until launch");
}

asio::awaitable<void> via_async_wait(release_line& line, cuda::stream& s, cuda::wait_mode mode, int n,
                                     std::vector<double>& out) {
  for (int i = 0; i < n; ++i) {
    launch(line, s);
    line.arm();
    co_await cuda::async_wait(s, mode, asio::use_awaitable);
    out.push_back(line.latency_ns());
  }
}

template <class Handler>
void CUDART_CB post_handler(void* p) {
  std::unique_ptr<Handler> h(static_cast<Handler*>(p));
  auto ex = asio::get_associated_executor(*h);
  asio::post(ex, std::move(*h));
}

struct host_func_wait {
  cudaStream_t stream;
  template <class Handler>
  void operator()(Handler&& handler) const {
    using H = std::decay_t<Handler>;
    auto* h = new H(std::forward<Handler>(handler));
    cuda::throw_if(cudaLaunchHostFunc(stream, &post_handler<H>, h), "cudaLaunchHostFunc");
  }
};

asio::awaitable<void> via_host_func(release_line& line, cuda::stream& s, int n, std::vector<double>& out) {
  for (int i = 0; i < n; ++i) {
    launch(line, s);
    line.arm();
    co_await asio::async_initiate<const asio::use_awaitable_t<>&, void()>(host_func_wait{s.native_handle()},
                                                                          asio::use_awaitable);
    out.push_back(line.latency_ns());
  }
}

asio::awaitable<void> via_busy_poll(release_line& line, cuda::stream& s, cuda::event& e, int n,
                                    std::vector<double>& out) {
  auto ex = co_await asio::this_coro::executor;
  for (int i = 0; i < n; ++i) {
    launch(line, s);
    e.record(s);
    line.arm();
    while (!e.ready()) co_await asio::post(ex, asio::use_awaitable);
    out.push_back(line.latency_ns());
  }
}

void via_event_sync(release_line& line, cuda::stream& s, cuda::event& e, int n, std::vector<double>& out) {
  for (int i = 0; i < n; ++i) {
    launch(line, s);
    e.record(s);
    line.arm();
    e.synchronize();
    out.push_back(line.latency_ns());
  }
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  const auto k = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = 1000, warmup = 200, rounds = 3;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") json = true;
    else if (a == "--iterations" && i + 1 < argc) iterations = std::max(1, std::atoi(argv[++i]));
    else if (a == "--warmup" && i + 1 < argc) warmup = std::max(0, std::atoi(argv[++i]));
    else if (a == "--rounds" && i + 1 < argc) rounds = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: bench_cuda_event_await [--iterations N] [--warmup W] [--rounds R] [--json]\n");
      return 2;
    }
  }
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_event_await: skipped: no GPU (%s)\n", cuda::unavailable_reason().c_str());
    return 0;
  }

  cudaDeviceProp prop{};
  cuda::throw_if(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  release_line line(0);
  cuda::stream s(0);
  cuda::event spin_event(0), blocking_event(0, cudaEventDisableTiming | cudaEventBlockingSync);
  asio::io_context io;

  struct variant {
    const char* label;
    std::function<void(int, std::vector<double>&)> run;
    std::vector<double> ns = {};
    std::vector<double> round_medians = {};
  };
  const auto on_io = [&io](asio::awaitable<void> a) {
    auto done = asio::co_spawn(io, std::move(a), asio::use_future);
    io.restart();
    io.run();
    done.get();
  };
  const cuda::wait_mode modes[] = {cuda::wait_mode::callback, cuda::wait_mode::busy, cuda::wait_mode::adaptive};
  const char* const mode_names[] = {"callback", "busy", "adaptive"};
  std::vector<variant> variants = {
      {"cudaEventSynchronize, thread",
       [&](int n, std::vector<double>& out) { via_event_sync(line, s, spin_event, n, out); }},
      {"cudaEventSynchronize, blocking sync",
       [&](int n, std::vector<double>& out) { via_event_sync(line, s, blocking_event, n, out); }},
      {"cudaLaunchHostFunc -> post",
       [&](int n, std::vector<double>& out) {
         // The raw host function holds no work on the io_context: a guard keeps run() going.
         auto guard = asio::make_work_guard(io);
         auto done = asio::co_spawn(io, via_host_func(line, s, n, out), asio::use_future);
         io.restart();
         while (done.wait_for(std::chrono::seconds(0)) != std::future_status::ready) io.run_one();
         done.get();
       }},
      {"busy poll cudaEventQuery on io_context",
       [&](int n, std::vector<double>& out) { on_io(via_busy_poll(line, s, spin_event, n, out)); }},
  };
  // variants[0] is the baseline; the async_wait modes follow it, in modes[] order.
  std::vector<std::string> labels;
  for (const char* m : mode_names) labels.push_back(std::string("async_wait, ") + m);
  for (std::size_t k = 0; k < std::size(modes); ++k)
    variants.insert(variants.begin() + 1 + static_cast<std::ptrdiff_t>(k),
                    variant{labels[k].c_str(), [&, mode = modes[k]](int n, std::vector<double>& out) {
                              on_io(via_async_wait(line, s, mode, n, out));
                            }});

  std::vector<double> scratch;
  for (auto& v : variants) v.run(warmup, scratch);  // module load, contexts, thread start-up
  for (int r = 0; r < rounds; ++r)
    for (auto& v : variants) {
      std::vector<double> round;
      v.run(iterations, round);
      v.round_medians.push_back(percentile(round, 0.5));
      v.ns.insert(v.ns.end(), round.begin(), round.end());
    }
  if (*line.timed_out() != 0) {
    std::fprintf(stderr, "bench_cuda_event_await: a spin kernel timed out: the numbers are void\n");
    return 1;
  }

  const auto median_us = [](const variant& v) { return percentile(v.ns, 0.5) / 1000; };
  const double base = median_us(variants[0]);
  std::size_t default_index = 1;
  for (std::size_t k = 0; k < std::size(modes); ++k)
    if (modes[k] == cuda::default_wait_mode) default_index = 1 + k;
  const double ours = median_us(variants[default_index]);
  FILE* table = json ? stderr : stdout;
  std::fprintf(table,
               "cuda_event_await on %s (%d SMs), %d rounds x %d iterations, %d warm-up, "
               "kernel exit -> waiter runs:\n",
               prop.name, prop.multiProcessorCount, rounds, iterations, warmup);
  std::fprintf(table, "  %-40s %9s %9s %9s   %s\n", "variant", "p10 us", "median us", "p90 us", "round medians us");
  for (const auto& v : variants) {
    std::string per_round;
    for (double m : v.round_medians)
      per_round += (per_round.empty() ? "" : " / ") + std::to_string(m / 1000).substr(0, 6);
    std::fprintf(table, "  %-40s %9.2f %9.2f %9.2f   %s\n", v.label, percentile(v.ns, 0.1) / 1000,
                 percentile(v.ns, 0.5) / 1000, percentile(v.ns, 0.9) / 1000, per_round.c_str());
  }
  std::fprintf(table, "  ratio async_wait (default, %s) / cudaEventSynchronize (medians): %.3f\n",
               mode_names[default_index - 1], ours / base);
  if (json) {
    std::printf("{\"name\":\"cuda.event_await\",\"value\":%.2f,\"unit\":\"us\",\"baseline\":%.2f,\"ratio\":%.3f}\n",
                ours, base, ours / base);
    for (std::size_t k = 0; k < std::size(modes); ++k) {
      const double v = median_us(variants[1 + k]);
      std::printf("{\"name\":\"cuda.event_await_%s\",\"value\":%.2f,\"unit\":\"us\",\"baseline\":%.2f,"
                  "\"ratio\":%.3f}\n",
                  mode_names[k], v, base, v / base);
    }
  }
  return 0;
}
