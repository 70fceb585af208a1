// What the CUDA suite's cases share: a host flag a kernel can wait on, running an io_context
// until something happened, and scenarios run in a child process.
#pragma once

#include <shardline/cuda/pinned_buffer.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace gpu_test {

/// A word of mapped pinned memory: the host sets it, a kernel on device `device` reads it.
class host_flag {
public:
  explicit host_flag(int device)
      : memory_(2 * sizeof(std::uint32_t), device, cudaHostAllocMapped | cudaHostAllocPortable) {
    words()[0] = 0;
    words()[1] = 0;
  }
  void set() { std::atomic_ref<std::uint32_t>(words()[0]).store(1, std::memory_order_release); }
  void reset() { std::atomic_ref<std::uint32_t>(words()[0]).store(0, std::memory_order_release); }
  bool is_set() { return std::atomic_ref<std::uint32_t>(words()[0]).load(std::memory_order_acquire) != 0; }
  /// For spin_until: the flag, and the word it reports a timeout in.
  const volatile std::uint32_t* flag() { return words(); }
  std::uint32_t* timed_out() { return words() + 1; }

private:
  std::uint32_t* words() { return reinterpret_cast<std::uint32_t*>(memory_.data()); }
  shardline::cuda::pinned_buffer memory_;
};

/// Runs `io` until `done()`, failing the case when it does not come within `limit`.
template <class Predicate>
void run_until(asio::io_context& io, Predicate done, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (io.stopped()) io.restart();
    io.run_one_for(std::chrono::milliseconds(10));
    if (std::chrono::steady_clock::now() > end) {
      FAIL("nothing completed within " << limit.count() << " ms");
      return;
    }
  }
}

/// Runs one child scenario (`shardline_gpu_tests --child NAME`, in test_cuda_async_wait.cpp);
/// its exit status tells the parent the outcome, its stdout the details.
int run_child(const std::string& name);

/// Child scenarios a test file registers for itself (`--child NAME:ARGUMENT` runs
/// `scenario(ARGUMENT)` and exits with its result): processes that must start without the
/// parent's CUDA state, such as the other side of a CUDA IPC link (CUDA forbids using it in a
/// child forked after initialisation).
using child_scenario = int (*)(const std::string& argument);

inline std::map<std::string, child_scenario>& child_scenarios() {
  static std::map<std::string, child_scenario> registry;
  return registry;
}

struct register_child {
  register_child(const std::string& name, child_scenario scenario) { child_scenarios()[name] = scenario; }
};

/// Runs this executable with `--child name` and returns its exit status (-1 if it did not
/// exit normally), its stdout and stderr in `output`.
int spawn_child(const std::string& name, std::string& output);

}  // namespace gpu_test
