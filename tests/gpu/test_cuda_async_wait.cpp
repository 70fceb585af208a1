// cuda::async_wait: GPU work awaited on an executor without blocking it. Every case runs in
// each wait_mode (callback, busy, adaptive) unless it is about one. The cases of test suite
// "gpu" need a GPU; the others run everywhere (with no GPU, the error path).
#include <shardline/cuda/async_wait.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/pinned_buffer.hpp>
#include <shardline/cuda/stream.hpp>

#include <asio/bind_allocator.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "gpu_kernels.hpp"
#include "gpu_support.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <variant>
#include <vector>

namespace cuda = shardline::cuda;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

template <cuda::wait_mode Mode>
struct in_mode {
  static constexpr cuda::wait_mode value = Mode;
};
using callback_mode = in_mode<cuda::wait_mode::callback>;
using busy_mode = in_mode<cuda::wait_mode::busy>;
using adaptive_mode = in_mode<cuda::wait_mode::adaptive>;
#define ALL_WAIT_MODES callback_mode, busy_mode, adaptive_mode
#define POLLED_WAIT_MODES busy_mode, adaptive_mode

std::string name_of(cuda::wait_mode m) {
  switch (m) {
    case cuda::wait_mode::callback: return "callback";
    case cuda::wait_mode::busy: return "busy";
    case cuda::wait_mode::adaptive: return "adaptive";
  }
  return "?";
}

cuda::detail::event_poller& poller_of(asio::io_context& io) {
  return asio::use_service<cuda::detail::event_poller>(io);
}

void check(cudaError_t e, const char* what) { cuda::throw_if(e, what); }

// An allocator that counts what it hands out, to see the op allocate with it and free
// before the upcall.
struct allocation_count {
  int allocations = 0;
  int live = 0;
};

template <class T>
struct counting_allocator {
  using value_type = T;
  allocation_count* count;
  explicit counting_allocator(allocation_count* c) noexcept : count(c) {}
  template <class U>
  counting_allocator(const counting_allocator<U>& o) noexcept : count(o.count) {}
  T* allocate(std::size_t n) {
    ++count->allocations;
    ++count->live;
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    --count->live;
    std::allocator<T>().deallocate(p, n);
  }
  template <class U>
  bool operator==(const counting_allocator<U>& o) const noexcept {
    return count == o.count;
  }
};

std::uint64_t splitmix(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void fill_random(std::span<std::byte> bytes) {
  std::uint64_t state = std::random_device{}();
  const std::size_t words = bytes.size() / 8;
  auto* w = reinterpret_cast<std::uint64_t*>(bytes.data());
  for (std::size_t i = 0; i < words; ++i) w[i] = splitmix(state);
  for (std::size_t i = words * 8; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>(splitmix(state));
}

// Copies `src` to the device and back into `dst` on `s`, then awaits the stream.
asio::awaitable<void> round_trip(cuda::stream& s, cuda::pinned_buffer& src, cuda::device_buffer& dev,
                                 cuda::pinned_buffer& dst, cuda::wait_mode mode, bool& resumed) {
  check(cudaMemcpyAsync(dev.data(), src.data(), src.size(), cudaMemcpyHostToDevice, s.native_handle()),
        "cudaMemcpyAsync to the device");
  check(cudaMemcpyAsync(dst.data(), dev.data(), dst.size(), cudaMemcpyDeviceToHost, s.native_handle()),
        "cudaMemcpyAsync to the host");
  co_await cuda::async_wait(s, mode, asio::use_awaitable);
  resumed = true;
}

asio::awaitable<void> wait_or_time_out(cuda::stream& s, cuda::wait_mode mode, std::chrono::milliseconds timeout,
                                       int& winner, clock_type::time_point& returned) {
  using namespace asio::experimental::awaitable_operators;
  asio::steady_timer timer(co_await asio::this_coro::executor, timeout);
  auto r = co_await (cuda::async_wait(s, mode, asio::use_awaitable) || timer.async_wait(asio::use_awaitable));
  winner = static_cast<int>(r.index());
  returned = clock_type::now();
}

asio::awaitable<void> await_or_catch(cudaStream_t s, cuda::wait_mode mode, std::error_code& caught) {
  try {
    co_await cuda::async_wait(s, mode, asio::use_awaitable);
  } catch (const std::system_error& e) {
    caught = e.code();
  }
}

}  // namespace

// ---- everywhere ---------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda async_wait: the op is allocated with the handler's allocator and freed before the upcall", M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  asio::io_context io;
  cuda::stream s;
  const bool gpu = cuda::device_count() > 0;
  if (gpu) {
    s = cuda::stream(0);
    check(gpu_test::sleep_for(1'000'000, s.native_handle()), "sleep_for");
  }
  allocation_count count;
  bool called = false;
  int live_at_upcall = -1;
  std::error_code got;
  cuda::async_wait(io.get_executor(), s.native_handle(), mode,
                   asio::bind_allocator(counting_allocator<void>(&count), [&](std::error_code ec) {
                     called = true;
                     got = ec;
                     live_at_upcall = count.live;
                   }));
  CHECK_FALSE(called);  // never inline
  CHECK(count.allocations >= 1);
  gpu_test::run_until(io, [&] { return called; });
  CHECK(live_at_upcall == 0);
  CHECK(count.live == 0);
  if (gpu)
    CHECK_FALSE(got);
  else
    CHECK(got.category() == cuda::error_category());
}

TEST_CASE_TEMPLATE("cuda async_wait: with no usable GPU every token gets the CUDA error, through the executor", M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  if (cuda::device_count() > 0) return;  // the successful side is in suite "gpu"
  asio::io_context io;
  const cudaStream_t legacy = nullptr;

  std::error_code by_callback;
  bool called = false;
  cuda::async_wait(io.get_executor(), legacy, mode, [&](std::error_code ec) {
    called = true;
    by_callback = ec;
  });
  CHECK_FALSE(called);
  io.run();
  CHECK(called);
  CHECK(by_callback.category() == cuda::error_category());
  CHECK(by_callback.message() == cudaGetErrorString(static_cast<cudaError_t>(by_callback.value())));
  MESSAGE("async_wait without a GPU: " << by_callback.message());

  io.restart();
  auto future = cuda::async_wait(io.get_executor(), legacy, mode, asio::use_future);
  io.run();
  CHECK_THROWS_AS(future.get(), std::system_error);

  io.restart();
  std::error_code by_deferred;
  auto deferred = cuda::async_wait(io.get_executor(), legacy, mode, asio::experimental::deferred);
  std::move(deferred)([&](std::error_code ec) { by_deferred = ec; });
  io.run();
  CHECK(by_deferred == by_callback);

  io.restart();
  std::error_code by_coroutine;
  asio::co_spawn(io, await_or_catch(legacy, mode, by_coroutine), asio::detached);
  io.run();
  CHECK(by_coroutine == by_callback);
}

// ---- on a GPU -----------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda async_wait: a coroutine resumes after a 512 MiB round trip, with every byte in place" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  const std::size_t bytes = std::size_t(512) << 20;
  cuda::pinned_buffer src(bytes, 0), dst(bytes, 0);
  cuda::device_buffer dev(bytes, 0);
  fill_random(src.bytes());
  std::memset(dst.data(), 0xAB, bytes);
  cuda::stream s(0);
  asio::io_context io;
  bool resumed = false;
  auto done = asio::co_spawn(io, round_trip(s, src, dev, dst, mode, resumed), asio::use_future);
  gpu_test::run_until(io, [&] { return done.wait_for(0s) == std::future_status::ready; });
  done.get();
  CHECK(resumed);
  CHECK(std::memcmp(src.data(), dst.data(), bytes) == 0);
}

TEST_CASE_TEMPLATE("cuda async_wait: a callback runs on the io_context after a kernel and its copy are done" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  const std::size_t words = std::size_t(64) << 20;  // 256 MiB
  const std::uint32_t seed = std::random_device{}();
  cuda::device_buffer dev(words * 4, 0);
  cuda::pinned_buffer host(words * 4, 0);
  std::memset(host.data(), 0, host.size());
  cuda::stream s(0);
  check(gpu_test::fill_words(reinterpret_cast<std::uint32_t*>(dev.data()), words, seed, s.native_handle()),
        "fill_words");
  check(cudaMemcpyAsync(host.data(), dev.data(), dev.size(), cudaMemcpyDeviceToHost, s.native_handle()),
        "cudaMemcpyAsync");
  asio::io_context io;
  bool called = false, on_io_thread = false;
  std::error_code got;
  cuda::async_wait(io.get_executor(), s, mode, [&](std::error_code ec) {
    called = true;
    got = ec;
    on_io_thread = io.get_executor().running_in_this_thread();
  });
  gpu_test::run_until(io, [&] { return called; });
  CHECK_FALSE(got);
  CHECK(on_io_thread);
  const auto* w = reinterpret_cast<const std::uint32_t*>(host.data());
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < words; ++i) wrong += w[i] != gpu_test::word(i, seed);
  CHECK(wrong == 0);
}

TEST_CASE_TEMPLATE("cuda async_wait: the io_context keeps running while the GPU works" * doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  // The kernel spins until a timer on the same io_context sets the flag: a wait that blocked
  // the io_context's thread would never see it.
  gpu_test::host_flag flag(0);
  cuda::stream s(0);
  check(gpu_test::spin_until(flag.flag(), flag.timed_out(), 10'000'000'000ull, s.native_handle()), "spin_until");
  asio::io_context io;
  bool waited = false;
  cuda::async_wait(io.get_executor(), s, mode, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    CHECK(flag.is_set());
    waited = true;
  });
  asio::steady_timer timer(io, 30ms);
  timer.async_wait([&](std::error_code) {
    CHECK_FALSE(waited);
    flag.set();
  });
  gpu_test::run_until(io, [&] { return waited; });
  CHECK(*flag.timed_out() == 0);
}

TEST_CASE_TEMPLATE("cuda async_wait: callback, use_future, deferred and use_awaitable complete after the work" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  cuda::stream s(0);
  asio::io_context io;
  const auto sleep = [&] {
    check(gpu_test::sleep_for(5'000'000, s.native_handle()), "sleep_for");  // 5 ms
    return clock_type::now();
  };

  auto start = sleep();
  clock_type::time_point end;
  cuda::async_wait(io.get_executor(), s, mode, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    end = clock_type::now();
  });
  gpu_test::run_until(io, [&] { return end != clock_type::time_point{}; });
  CHECK(end - start >= 4ms);

  start = sleep();
  auto future = cuda::async_wait(io.get_executor(), s, mode, asio::use_future);
  gpu_test::run_until(io, [&] { return future.wait_for(0s) == std::future_status::ready; });
  CHECK_NOTHROW(future.get());
  CHECK(clock_type::now() - start >= 4ms);

  start = sleep();
  end = {};
  auto deferred = cuda::async_wait(io.get_executor(), s, mode, asio::experimental::deferred);
  std::move(deferred)([&](std::error_code ec) {
    CHECK_FALSE(ec);
    end = clock_type::now();
  });
  gpu_test::run_until(io, [&] { return end != clock_type::time_point{}; });
  CHECK(end - start >= 4ms);

  start = sleep();
  std::error_code caught = cuda::make_error_code(cudaErrorUnknown);
  bool finished = false;
  asio::co_spawn(io, await_or_catch(s.native_handle(), mode, caught), [&](std::exception_ptr) { finished = true; });
  gpu_test::run_until(io, [&] { return finished; });
  CHECK(caught == cuda::make_error_code(cudaErrorUnknown));  // not thrown: no error
  CHECK(clock_type::now() - start >= 4ms);
}

TEST_CASE_TEMPLATE("cuda async_wait: 512 waits on 8 streams complete each after its own work, in stream order" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  constexpr int streams = 8, waits = 64;
  cuda::pinned_buffer markers(streams * sizeof(std::uint32_t), 0, cudaHostAllocMapped | cudaHostAllocPortable);
  auto* marker = reinterpret_cast<std::uint32_t*>(markers.data());
  std::fill(marker, marker + streams, 0u);
  std::vector<cuda::stream> s;
  for (int i = 0; i < streams; ++i) s.emplace_back(0);
  std::mt19937 random(std::random_device{}());

  asio::io_context io;
  std::vector<std::vector<int>> order(streams);
  int late = 0, failed = 0, done = 0;
  for (int k = 1; k <= waits; ++k)
    for (int i = 0; i < streams; ++i) {
      check(gpu_test::sleep_for(random() % 200'000, s[i].native_handle()), "sleep_for");
      check(gpu_test::write_value(marker + i, k, s[i].native_handle()), "write_value");
      cuda::async_wait(io.get_executor(), s[i], mode, [&, i, k](std::error_code ec) {
        failed += ec ? 1 : 0;
        late += std::atomic_ref<std::uint32_t>(marker[i]).load() < std::uint32_t(k) ? 1 : 0;
        order[i].push_back(k);
        ++done;
      });
    }
  gpu_test::run_until(io, [&] { return done == streams * waits; });
  CHECK(failed == 0);
  CHECK(late == 0);
  for (int i = 0; i < streams; ++i) {
    INFO("stream " << i);
    CHECK(std::is_sorted(order[i].begin(), order[i].end()));
    CHECK(order[i].size() == std::size_t(waits));
  }

  // The same on a pool of 4 threads: completions may interleave, each still after its work.
  asio::thread_pool pool(4);
  std::fill(marker, marker + streams, 0u);
  std::atomic<int> pool_late = 0, pool_failed = 0, pool_done = 0;
  for (int k = 1; k <= waits; ++k)
    for (int i = 0; i < streams; ++i) {
      check(gpu_test::sleep_for(random() % 200'000, s[i].native_handle()), "sleep_for");
      check(gpu_test::write_value(marker + i, k, s[i].native_handle()), "write_value");
      cuda::async_wait(pool.get_executor(), s[i], mode, [&, i, k](std::error_code ec) {
        pool_failed += ec ? 1 : 0;
        pool_late += std::atomic_ref<std::uint32_t>(marker[i]).load() < std::uint32_t(k) ? 1 : 0;
        ++pool_done;
      });
    }
  pool.join();  // the waits keep the pool busy until each has completed
  CHECK(pool_done == streams * waits);
  CHECK(pool_failed == 0);
  CHECK(pool_late == 0);
}

TEST_CASE_TEMPLATE("cuda async_wait: an event's wait ends at its record, not at later work on the stream" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  gpu_test::host_flag flag(0);
  cuda::stream s(0);
  cuda::event e(0);
  check(gpu_test::sleep_for(10'000'000, s.native_handle()), "sleep_for");  // 10 ms
  e.record(s);
  check(gpu_test::spin_until(flag.flag(), flag.timed_out(), 10'000'000'000ull, s.native_handle()), "spin_until");
  asio::io_context io;
  bool event_done = false, stream_done = false;
  cuda::async_wait(io.get_executor(), e, mode, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    CHECK_FALSE(flag.is_set());  // the stream still spins behind the record
    event_done = true;
    flag.set();
  });
  cuda::async_wait(io.get_executor(), s, mode, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    CHECK(event_done);
    stream_done = true;
  });
  gpu_test::run_until(io, [&] { return stream_done; });
  CHECK(*flag.timed_out() == 0);

  cuda::event never(0);
  bool at_once = false;
  cuda::async_wait(io.get_executor(), never, mode, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    at_once = true;
  });
  gpu_test::run_until(io, [&] { return at_once; });
}

TEST_CASE_TEMPLATE("cuda async_wait: terminal cancellation reports operation_aborted, and only once the GPU is done" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  gpu_test::host_flag flag(0);
  cuda::stream s(0);
  asio::io_context io;
  for (auto type : {asio::cancellation_type::terminal, asio::cancellation_type::total}) {
    INFO("cancellation type " << static_cast<int>(type));
    flag.reset();
    check(gpu_test::spin_until(flag.flag(), flag.timed_out(), 10'000'000'000ull, s.native_handle()), "spin_until");
    asio::cancellation_signal signal;
    bool done = false, released_before = false;
    std::error_code got;
    cuda::async_wait(io.get_executor(), s, mode, asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) {
                       done = true;
                       got = ec;
                       released_before = flag.is_set();
                     }));
    io.run_for(20ms);
    CHECK_FALSE(done);
    signal.emit(type);
    io.restart();
    io.run_for(50ms);
    CHECK_FALSE(done);  // the kernel still spins: the completion waits for it
    flag.set();
    gpu_test::run_until(io, [&] { return done; });
    CHECK(released_before);
    if (type == asio::cancellation_type::terminal)
      CHECK(got == asio::error::operation_aborted);
    else
      CHECK_FALSE(got);  // total cancellation is not offered: ignored
    CHECK(*flag.timed_out() == 0);
  }
}

TEST_CASE_TEMPLATE("cuda async_wait: a timeout around GPU work returns only after the GPU work" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  gpu_test::host_flag flag(0);
  cuda::stream s(0);
  check(gpu_test::spin_until(flag.flag(), flag.timed_out(), 10'000'000'000ull, s.native_handle()), "spin_until");
  asio::io_context io;
  int winner = -1;
  clock_type::time_point returned{}, released{};
  asio::co_spawn(io, wait_or_time_out(s, mode, 20ms, winner, returned), asio::detached);
  asio::steady_timer release(io, 80ms);
  release.async_wait([&](std::error_code) {
    released = clock_type::now();
    flag.set();
  });
  gpu_test::run_until(io, [&] { return returned != clock_type::time_point{}; });
  CHECK(winner == 1);  // the timer
  CHECK(released != clock_type::time_point{});
  CHECK(returned >= released);
}

TEST_CASE_TEMPLATE("cuda async_wait: a stream being captured into a graph is refused with the CUDA text" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  cuda::stream s(0);
  check(cudaStreamBeginCapture(s.native_handle(), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  asio::io_context io;
  std::error_code got;
  bool done = false;
  cuda::async_wait(io.get_executor(), s, mode, [&](std::error_code ec) {
    got = ec;
    done = true;
  });
  cudaGraph_t graph = nullptr;
  (void)cudaStreamEndCapture(s.native_handle(), &graph);
  if (graph) (void)cudaGraphDestroy(graph);
  (void)cudaGetLastError();
  gpu_test::run_until(io, [&] { return done; });
  CHECK(got == cuda::make_error_code(cudaErrorStreamCaptureUnsupported));
  CHECK(got.message() == cudaGetErrorString(cudaErrorStreamCaptureUnsupported));
  MESSAGE("capturing stream: " << got.message());
  // The stream works again after the capture.
  bool again = false;
  cuda::async_wait(io.get_executor(), s, mode, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    again = true;
  });
  gpu_test::run_until(io, [&] { return again; });
}

TEST_CASE_TEMPLATE("cuda async_wait: a device fault completes the wait with the CUDA error instead of hanging" *
          doctest::test_suite("gpu"), M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  std::string output;
  const int status = gpu_test::spawn_child(std::string("fault-") + name_of(mode), output);
  INFO("child output:\n" << output);
  MESSAGE(output);
  CHECK(status == 0);
  CHECK(output.find(cudaGetErrorString(cudaErrorIllegalAddress)) != std::string::npos);
}


// ---- the polled modes ---------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda async_wait: a wait refused at once leaves no poll behind", M, POLLED_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  if (cuda::device_count() > 0) return;  // with a GPU the wait is accepted: suite "gpu" polls
  asio::io_context io;
  std::error_code got;
  cuda::async_wait(io.get_executor(), cudaStream_t{}, mode, [&](std::error_code ec) { got = ec; });
  io.run();  // returns: nothing keeps polling
  CHECK(got.category() == cuda::error_category());
  CHECK(poller_of(io).polls() == 0);
  CHECK(poller_of(io).backoff() == 0us);
}

TEST_CASE("cuda async_wait: the default mode is one the header documents as the default") {
  // A change of default must be a decision (the header explains this one), not an accident.
  CHECK(cuda::default_wait_mode == cuda::wait_mode::adaptive);
  const cuda::detail::poll_policy policy;
  CHECK(policy.first_backoff > 0us);
  CHECK(policy.first_backoff <= policy.max_backoff);
}

TEST_CASE_TEMPLATE("cuda async_wait: 8 waits on 8 streams complete in the order their work ends, not the order "
                   "they started" * doctest::test_suite("gpu"),
                   M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  // 8: CUDA maps streams onto 8 hardware queues by default (CUDA_DEVICE_MAX_CONNECTIONS); with
  // more, two streams can share one and the later one's work waits behind the earlier one's.
  constexpr int streams = 8;
  cuda::pinned_buffer markers(streams * sizeof(std::uint32_t), 0, cudaHostAllocMapped | cudaHostAllocPortable);
  auto* marker = reinterpret_cast<std::uint32_t*>(markers.data());
  std::fill(marker, marker + streams, 0u);
  std::vector<cuda::stream> s;
  for (int i = 0; i < streams; ++i) s.emplace_back(0);
  asio::io_context io;
  std::vector<int> order;
  int late = 0, failed = 0;
  // The first started ends last: 3 ms apart, far more than any wake-up path takes.
  for (int i = 0; i < streams; ++i) {
    check(gpu_test::sleep_for(std::uint64_t(streams - i) * 3'000'000, s[i].native_handle()), "sleep_for");
    check(gpu_test::write_value(marker + i, 1, s[i].native_handle()), "write_value");
    cuda::async_wait(io.get_executor(), s[i], mode, [&, i](std::error_code ec) {
      failed += ec ? 1 : 0;
      late += std::atomic_ref<std::uint32_t>(marker[i]).load() == 0 ? 1 : 0;
      order.push_back(i);
    });
  }
  gpu_test::run_until(io, [&] { return order.size() == std::size_t(streams); });
  CHECK(failed == 0);
  CHECK(late == 0);
  std::vector<int> expected(streams);
  for (int i = 0; i < streams; ++i) expected[i] = streams - 1 - i;
  CHECK(order == expected);
}

TEST_CASE_TEMPLATE("cuda async_wait: recording the event again after the wait started does not move the wait" *
                       doctest::test_suite("gpu"),
                   M, ALL_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  gpu_test::host_flag flag(0);
  cuda::stream s(0);
  cuda::event e(0);
  check(gpu_test::sleep_for(2'000'000, s.native_handle()), "sleep_for");
  e.record(s);
  asio::io_context io;
  bool done = false;
  cuda::async_wait(io.get_executor(), e, mode, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    CHECK_FALSE(flag.is_set());  // the second record still waits for the spinning kernel
    done = true;
  });
  check(gpu_test::spin_until(flag.flag(), flag.timed_out(), 10'000'000'000ull, s.native_handle()), "spin_until");
  e.record(s);
  gpu_test::run_until(io, [&] { return done; });
  CHECK_FALSE(e.ready());
  flag.set();
  s.synchronize();
  CHECK(*flag.timed_out() == 0);
}

TEST_CASE("cuda async_wait: the adaptive poller backs off while the GPU works, and spins again for a new wait" *
          doctest::test_suite("gpu")) {
  gpu_test::host_flag flag(0);
  cuda::stream long_work(0), short_work(0);
  asio::io_context io;
  auto& poller = poller_of(io);
  const auto policy = poller.policy();
  check(gpu_test::spin_until(flag.flag(), flag.timed_out(), 10'000'000'000ull, long_work.native_handle()),
        "spin_until");
  bool long_done = false;
  cuda::async_wait(io.get_executor(), long_work, cuda::wait_mode::adaptive, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    long_done = true;
  });
  CHECK(poller.backoff() == 0us);  // spinning first
  // The period doubles up to its cap once the spin is spent.
  gpu_test::run_until(io, [&] { return poller.backoff() == policy.max_backoff; });
  CHECK_FALSE(long_done);

  // Backed off: a timer never fires early, so an interval of T holds at most T / max_backoff
  // polls (+1 for the one in flight at its start). A busy loop makes hundreds of times more.
  const std::uint64_t polls_before = poller.polls();
  const auto start = clock_type::now();
  io.run_for(100ms);
  const auto elapsed = clock_type::now() - start;
  const std::uint64_t idle_polls = poller.polls() - polls_before;
  const auto bound = static_cast<std::uint64_t>(elapsed / policy.max_backoff) + 1;
  MESSAGE("adaptive poller, backed off: " << idle_polls << " polls in "
                                          << std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count()
                                          << " ms (bound " << bound << ")");
  CHECK(idle_polls >= 1);
  CHECK(idle_polls <= bound);
  CHECK(poller.backoff() == policy.max_backoff);

  // A new wait resets the backoff at once and completes while the long work still runs.
  bool short_done = false;
  check(gpu_test::sleep_for(1'000'000, short_work.native_handle()), "sleep_for");
  io.restart();
  cuda::async_wait(io.get_executor(), short_work, cuda::wait_mode::adaptive, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    short_done = true;
  });
  CHECK(poller.backoff() == 0us);
  gpu_test::run_until(io, [&] { return short_done; });
  CHECK_FALSE(long_done);

  // The busy mode, on the same poller, never backs off while its wait is pending.
  bool busy_done = false;
  check(gpu_test::sleep_for(20'000'000, short_work.native_handle()), "sleep_for");
  cuda::async_wait(io.get_executor(), short_work, cuda::wait_mode::busy, [&](std::error_code ec) {
    CHECK_FALSE(ec);
    busy_done = true;
  });
  bool backed_off = false;
  gpu_test::run_until(io, [&] {
    backed_off = backed_off || poller.backoff() != 0us;
    return busy_done;
  });
  CHECK_FALSE(backed_off);

  flag.set();
  gpu_test::run_until(io, [&] { return long_done; });
  CHECK(*flag.timed_out() == 0);
  io.restart();
  CHECK(io.run_for(10ms) == 0);  // nothing pending: the poller stopped
}

TEST_CASE_TEMPLATE("cuda async_wait: destroying the io_context with polled waits pending destroys their handlers "
                   "unrun" * doctest::test_suite("gpu"),
                   M, POLLED_WAIT_MODES) {
  constexpr cuda::wait_mode mode = M::value;
  INFO("mode " << name_of(mode));
  gpu_test::host_flag flag(0);
  cuda::stream s(0);
  cuda::event e(0);
  check(gpu_test::spin_until(flag.flag(), flag.timed_out(), 10'000'000'000ull, s.native_handle()), "spin_until");
  e.record(s);
  auto alive = std::make_shared<int>(0);
  std::weak_ptr<int> watch = alive;
  bool called = false;
  {
    asio::io_context io;
    cuda::async_wait(io.get_executor(), s, mode, [&, alive](std::error_code) { called = true; });
    cuda::async_wait(io.get_executor(), e, mode, [&, alive](std::error_code) { called = true; });
    alive.reset();
    io.run_for(20ms);
    CHECK_FALSE(called);
  }
  CHECK_FALSE(called);
  CHECK(watch.expired());  // both handlers destroyed with the context
  flag.set();
  s.synchronize();
  CHECK(*flag.timed_out() == 0);
}

// ---- child scenarios ----------------------------------------------------------------------

namespace gpu_test {

namespace {

// Waits on `s` for at most 20 s; prints and returns 0 when the wait completed with an error,
// 2 when it succeeded, 3 when it never completed.
int wait_and_report(cuda::stream& s, const std::string& what, cuda::wait_mode mode = cuda::default_wait_mode) {
  asio::io_context io;
  bool done = false;
  std::error_code got;
  cuda::async_wait(io.get_executor(), s, mode, [&](std::error_code ec) {
    got = ec;
    done = true;
  });
  const auto end = clock_type::now() + 20s;
  while (!done && clock_type::now() < end) io.run_one_for(10ms);
  if (!done) {
    std::printf("%s: async_wait did not complete within 20 s\n", what.c_str());
    return 3;
  }
  if (!got) {
    std::printf("%s: async_wait completed without an error\n", what.c_str());
    return 2;
  }
  std::printf("%s: async_wait completed with %s error %d: %s\n", what.c_str(), got.category().name(), got.value(),
              got.message().c_str());
  return 0;
}

}  // namespace

int run_child(const std::string& name) {
  int status = 1;
  try {
    cuda::stream s(0);
    // The sleep first: the wait is enqueued before the device faults, not refused after.
    if (name.starts_with("fault-") && name != "fault-host-func") {
      // fault-<mode>: the wait in that mode; polled, the device faults while the poller polls.
      cuda::wait_mode mode = cuda::default_wait_mode;
      for (auto m : {cuda::wait_mode::callback, cuda::wait_mode::busy, cuda::wait_mode::adaptive})
        if (name == std::string("fault-") + name_of(m)) mode = m;
      check(gpu_test::sleep_for(50'000'000, s.native_handle()), "sleep_for");
      check(gpu_test::fault(s.native_handle()), "fault");
      status = wait_and_report(s, std::string("a kernel writing through a null pointer, ") + name_of(mode) + " wait",
                               mode);
    } else if (name == "fault-host-func") {
      // Not a test: what the alternative to async_wait's stream callback, cudaLaunchHostFunc,
      // does after a device fault (its documentation says it is not called).
      static std::atomic<bool> called = false;
      check(gpu_test::sleep_for(50'000'000, s.native_handle()), "sleep_for");
      check(gpu_test::fault(s.native_handle()), "fault");
      const cudaError_t e = cudaLaunchHostFunc(s.native_handle(), [](void*) { called = true; }, nullptr);
      if (e != cudaSuccess) {
        std::printf("cudaLaunchHostFunc after the fault refused at once: %s\n", cudaGetErrorString(e));
      } else {
        const auto end = clock_type::now() + 5s;
        while (!called && clock_type::now() < end) std::this_thread::sleep_for(1ms);
        std::printf("cudaLaunchHostFunc after a device fault: host function %s\n",
                    called ? "called" : "not called within 5 s");
      }
      status = 0;
    } else if (name == "bad-copy") {
      cuda::device_buffer dst(4096, 0);
      const std::string what = "cudaMemcpyAsync of 4096 bytes from 0x10";
      const cudaError_t e = cudaMemcpyAsync(dst.data(), reinterpret_cast<const void*>(0x10), 4096,
                                            cudaMemcpyDeviceToDevice, s.native_handle());
      if (e != cudaSuccess) {
        try {
          cuda::throw_if(e, what);
        } catch (const shardline::error& x) {
          std::printf("refused at once: %s\n", x.what());
          status = 0;
        }
      } else {
        status = wait_and_report(s, what);
      }
    } else {
      std::printf("unknown child scenario '%s'\n", name.c_str());
    }
  } catch (const std::exception& e) {
    std::printf("child '%s' threw: %s\n", name.c_str(), e.what());
  }
  std::fflush(stdout);
  std::_Exit(status);  // the context may be lost: no teardown through it
}

int spawn_child(const std::string& name, std::string& output) {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) {
    output = "cannot read /proc/self/exe";
    return -1;
  }
  self[n] = '\0';
  const std::string command = "'" + std::string(self) + "' --child " + name + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) {
    output = "popen failed";
    return -1;
  }
  char buffer[4096];
  while (const std::size_t got = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, got);
  const int status = ::pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace gpu_test
