// CUDA errors as error codes and exceptions, and why no GPU is usable: the cases without a
// GPU run everywhere (CI included); those in test suite "gpu" need one.
#include <shardline/cuda/error.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/pinned_buffer.hpp>
#include <shardline/cuda/stream.hpp>

#include <doctest/doctest.h>

#include "gpu_support.hpp"

#include <cstdint>
#include <string>
#include <system_error>

namespace cuda = shardline::cuda;

TEST_CASE("cuda error: the category says 'cuda' and speaks cudaGetErrorString's words") {
  const std::error_code ec = cuda::make_error_code(cudaErrorMemoryAllocation);
  CHECK(std::string(ec.category().name()) == "cuda");
  CHECK(ec.category() == cuda::error_category());
  CHECK(ec.value() == cudaErrorMemoryAllocation);
  CHECK(ec.message() == "out of memory");
  CHECK(cuda::make_error_code(cudaErrorInvalidValue).message() == "invalid argument");
  CHECK(cuda::make_error_code(cudaErrorInvalidDevice).message() == "invalid device ordinal");
}

TEST_CASE("cuda error: common codes compare equal to their std::errc conditions") {
  CHECK(cuda::make_error_code(cudaErrorMemoryAllocation) == std::errc::not_enough_memory);
  CHECK(cuda::make_error_code(cudaErrorInvalidValue) == std::errc::invalid_argument);
  CHECK(cuda::make_error_code(cudaErrorInvalidDevice) != std::errc::invalid_argument);
  CHECK(cuda::make_error_code(cudaErrorInvalidDevice).default_error_condition().category() ==
        cuda::error_category());
}

TEST_CASE("cuda error: throw_if names the call and the cause once, and passes success") {
  CHECK_NOTHROW(cuda::throw_if(cudaSuccess, "cudaMalloc"));
  try {
    cuda::throw_if(cudaErrorMemoryAllocation, "cudaMalloc of 4096 bytes on device 1");
    FAIL("throw_if should have thrown");
  } catch (const shardline::error& e) {
    CHECK(std::string(e.what()) == "cudaMalloc of 4096 bytes on device 1: out of memory");
    CHECK(e.code() == cuda::make_error_code(cudaErrorMemoryAllocation));
  }
  try {
    cuda::throw_if(cudaErrorInvalidValue, "cudaMemcpyAsync: invalid argument");
    FAIL("throw_if should have thrown");
  } catch (const shardline::error& e) {
    CHECK(std::string(e.what()) == "cudaMemcpyAsync: invalid argument");  // said once
  }
  std::error_code ec = cuda::make_error_code(cudaErrorInvalidValue);
  CHECK_FALSE(cuda::set_if(cudaSuccess, ec));
  CHECK_FALSE(ec);
  CHECK(cuda::set_if(cudaErrorNotReady, ec));
  CHECK(ec == cuda::make_error_code(cudaErrorNotReady));
}

TEST_CASE("cuda device: the reason for no device says which of driver, GPU or versions is missing") {
  using cuda::detail::describe_unavailable;
  CHECK(describe_unavailable(cudaSuccess, 2, 13000, 13000, nullptr).empty());
  CHECK(describe_unavailable(cudaErrorInsufficientDriver, 0, 0, 13000, nullptr) == "no CUDA driver");
  CHECK(describe_unavailable(cudaErrorInsufficientDriver, 0, 12040, 13000, nullptr) ==
        "CUDA driver too old: it supports CUDA 12.4, this program's runtime is 13.0");
  CHECK(describe_unavailable(cudaErrorNoDevice, 0, 13000, 13000, nullptr) == "no GPU");
  CHECK(describe_unavailable(cudaSuccess, 0, 13000, 13000, nullptr) == "no GPU");
  CHECK(describe_unavailable(cudaErrorNoDevice, 0, 13000, 13000, "") == "no GPU (CUDA_VISIBLE_DEVICES='')");
  const std::string other = describe_unavailable(cudaErrorSystemDriverMismatch, 0, 13000, 13000, nullptr);
  CHECK(other.rfind("no usable GPU: cudaGetDeviceCount: ", 0) == 0);
  CHECK(other.find(cudaGetErrorString(cudaErrorSystemDriverMismatch)) != std::string::npos);
}

TEST_CASE("cuda device: device_count never throws and agrees with unavailable_reason") {
  int count = -1;
  CHECK_NOTHROW(count = cuda::device_count());
  CHECK(count >= 0);
  const std::string why = cuda::unavailable_reason();
  MESSAGE("CUDA devices: " << count << (why.empty() ? "" : " (" + why + ")"));
  CHECK(why.empty() == (count > 0));
  if (count == 0) CHECK(why.rfind("no ", 0) == 0);
}

TEST_CASE("cuda device: without a usable GPU every allocation is a clear error, never a crash") {
  if (cuda::device_count() > 0) return;  // the other side is covered in suite "gpu"
  try {
    cuda::device_buffer b(4096, 0);
    FAIL("cudaMalloc should have failed");
  } catch (const shardline::error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.rfind("cudaMalloc of 4096 bytes on device 0: ", 0) == 0);
    CHECK(e.code().category() == cuda::error_category());
  }
  CHECK_THROWS_AS((void)cuda::pinned_buffer(4096, 0), shardline::error);
  CHECK_THROWS_WITH_AS((void)cuda::stream(0), doctest::Contains("cudaStreamCreate on device 0: "), shardline::error);
}

TEST_CASE("cuda error: an allocation larger than the device names the call, size, device and 'out of memory'" *
          doctest::test_suite("gpu")) {
  const std::size_t huge = std::size_t(1) << 50;
  try {
    cuda::device_buffer b(huge, 0);
    FAIL("a 1 PiB cudaMalloc should have failed");
  } catch (const shardline::error& e) {
    CHECK(std::string(e.what()) == "cudaMalloc of " + std::to_string(huge) + " bytes on device 0: out of memory");
    CHECK(e.code() == std::errc::not_enough_memory);
  }
  CHECK(cudaGetLastError() == cudaSuccess);  // the failure does not linger
  cuda::device_buffer after(4096, 0);          // and the device still works
  CHECK(after.valid());
}

TEST_CASE("cuda error: a device that does not exist is an 'invalid device ordinal' error naming it" *
          doctest::test_suite("gpu")) {
  const int missing = cuda::device_count();
  try {
    cuda::device_buffer b(4096, missing);
    FAIL("device " << missing << " should not exist");
  } catch (const shardline::error& e) {
    CHECK(std::string(e.what()) ==
          "cudaMalloc of 4096 bytes on device " + std::to_string(missing) + ": invalid device ordinal");
  }
  CHECK_THROWS_WITH_AS((void)cuda::stream(missing),
                       ("cudaStreamCreate on device " + std::to_string(missing) + ": invalid device ordinal").c_str(),
                       shardline::error);
  int current = -1;
  REQUIRE(cudaGetDevice(&current) == cudaSuccess);
  CHECK(current == 0);  // the failed switch left the current device alone
}

TEST_CASE("cuda error: cudaMemcpyAsync with a pointer that is no allocation is reported with its text" *
          doctest::test_suite("gpu")) {
  // In a child: depending on the driver the bad copy is refused at once or faults the device,
  // and a fault would poison this process's context. Either way: the CUDA text, no crash, no hang.
  std::string output;
  const int status = gpu_test::spawn_child("bad-copy", output);
  INFO("child output:\n" << output);
  MESSAGE(output);
  CHECK(status == 0);
  CHECK(output.find("cudaMemcpyAsync of 4096 bytes from 0x10") != std::string::npos);
}
