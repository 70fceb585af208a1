// The RAII handles: stream, event, device and pinned buffers. Moves and empty handles need
// no GPU; the cases of test suite "gpu" create real ones.
#include <shardline/cuda/stream.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/pinned_buffer.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace cuda = shardline::cuda;
using shardline::memory_location;

namespace {

template <class T>
constexpr bool move_only = std::is_nothrow_move_constructible_v<T> && std::is_nothrow_move_assignable_v<T> &&
                           !std::is_copy_constructible_v<T> && !std::is_copy_assignable_v<T> &&
                           std::is_nothrow_destructible_v<T>;

std::size_t free_device_memory(int device) {
  int previous = 0;
  REQUIRE(cudaGetDevice(&previous) == cudaSuccess);
  REQUIRE(cudaSetDevice(device) == cudaSuccess);
  std::size_t free = 0, total = 0;
  REQUIRE(cudaMemGetInfo(&free, &total) == cudaSuccess);
  REQUIRE(cudaSetDevice(previous) == cudaSuccess);
  return free;
}

}  // namespace

static_assert(move_only<cuda::stream> && move_only<cuda::event> && move_only<cuda::device_buffer> &&
              move_only<cuda::pinned_buffer>);

TEST_CASE("cuda handles: default-constructed handles are empty and destroy without CUDA") {
  cuda::stream s;
  cuda::event e;
  cuda::device_buffer d;
  cuda::pinned_buffer p;
  CHECK_FALSE(s.valid());
  CHECK_FALSE(e.valid());
  CHECK_FALSE(d.valid());
  CHECK_FALSE(p.valid());
  CHECK(d.size() == 0);
  CHECK(d.bytes().empty());
  CHECK(p.location() == memory_location::host_pinned());
  cuda::stream moved(std::move(s));
  CHECK_FALSE(moved.valid());
}

TEST_CASE("cuda handles: streams and events are created on their device, which they remember" *
          doctest::test_suite("gpu")) {
  const int devices = cuda::device_count();
  int current = -1;
  REQUIRE(cudaGetDevice(&current) == cudaSuccess);
  for (int d = 0; d < devices; ++d) {
    INFO("device " << d);
    cuda::stream s(d);
    cuda::event e(d);
    CHECK(s.valid());
    CHECK(s.device() == d);
    CHECK(e.device() == d);
    int stream_device = -1;
    REQUIRE(cudaStreamGetDevice(s.native_handle(), &stream_device) == cudaSuccess);
    CHECK(stream_device == d);
    e.record(s);
    s.synchronize();
    CHECK(s.ready());
    CHECK(e.ready());
    int now = -1;
    REQUIRE(cudaGetDevice(&now) == cudaSuccess);
    CHECK(now == current);  // creation left the current device alone

    cuda::stream moved(std::move(s));
    CHECK_FALSE(s.valid());
    CHECK(moved.valid());
    CHECK(moved.device() == d);
  }
}

TEST_CASE("cuda handles: timing events measure a copy" * doctest::test_suite("gpu")) {
  cuda::stream s(0);
  cuda::event start(0, cudaEventDefault), stop(0, cudaEventDefault);
  cuda::device_buffer a(64 << 20, 0), b(64 << 20, 0);
  REQUIRE(cudaMemsetAsync(a.data(), 0x5A, a.size(), s.native_handle()) == cudaSuccess);
  start.record(s);
  REQUIRE(cudaMemcpyAsync(b.data(), a.data(), a.size(), cudaMemcpyDeviceToDevice, s.native_handle()) == cudaSuccess);
  stop.record(s);
  stop.synchronize();
  CHECK(elapsed_ms(start, stop) > 0.0f);
}

TEST_CASE("cuda handles: device buffers live on their device, are device memory, and are freed" *
          doctest::test_suite("gpu")) {
  const std::size_t bytes = std::size_t(1) << 30;
  for (int d = 0; d < cuda::device_count(); ++d) {
    INFO("device " << d);
    const std::size_t before = free_device_memory(d);
    void* address = nullptr;
    {
      cuda::device_buffer b(bytes, d);
      address = b.data();
      CHECK(b.size() == bytes);
      CHECK(b.device() == d);
      CHECK(b.location() == memory_location::cuda(d));
      CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % 256 == 0);
      cudaPointerAttributes a{};
      REQUIRE(cudaPointerGetAttributes(&a, b.data()) == cudaSuccess);
      CHECK(a.type == cudaMemoryTypeDevice);
      CHECK(a.device == d);
      CHECK(free_device_memory(d) + bytes <= before);

      cuda::device_buffer moved;
      moved = std::move(b);
      CHECK_FALSE(b.valid());
      CHECK(moved.data() == address);
      CHECK(moved.location() == memory_location::cuda(d));
    }
    CHECK(free_device_memory(d) + (64u << 20) >= before);  // given back
  }
}

TEST_CASE("cuda handles: pinned buffers are page-locked host memory the GPU copies from, and are freed" *
          doctest::test_suite("gpu")) {
  const std::size_t bytes = std::size_t(64) << 20;
  void* address = nullptr;
  {
    cuda::pinned_buffer p(bytes, 0);
    address = p.data();
    CHECK(p.size() == bytes);
    CHECK(p.device() == 0);
    CHECK(p.location() == memory_location::host_pinned());
    CHECK(reinterpret_cast<std::uintptr_t>(p.data()) % 4096 == 0);
    cudaPointerAttributes a{};
    REQUIRE(cudaPointerGetAttributes(&a, p.data()) == cudaSuccess);
    CHECK(a.type == cudaMemoryTypeHost);
    std::memset(p.data(), 0x3C, p.size());
    cuda::device_buffer d(bytes, 0);
    REQUIRE(cudaMemcpy(d.data(), p.data(), bytes, cudaMemcpyHostToDevice) == cudaSuccess);
    std::vector<std::byte> back(bytes);
    REQUIRE(cudaMemcpy(back.data(), d.data(), bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(std::memcmp(back.data(), p.data(), bytes) == 0);
  }
  cudaPointerAttributes after{};
  REQUIRE(cudaPointerGetAttributes(&after, address) == cudaSuccess);
  CHECK(after.type == cudaMemoryTypeUnregistered);  // freed
}
