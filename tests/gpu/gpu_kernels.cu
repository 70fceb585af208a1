// Tiny kernels for the GPU suite and the CUDA benchmarks; see gpu_kernels.hpp.
#include "gpu_kernels.hpp"

#include <shardline/cuda/fuse.cuh>

#include <span>

namespace gpu_test {
namespace {

__device__ std::uint32_t device_word(std::size_t i, std::uint32_t seed) {
  std::uint64_t x = (static_cast<std::uint64_t>(i) << 32 | seed) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  return static_cast<std::uint32_t>(x >> 32);
}

__device__ std::uint64_t now_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void fill_kernel(std::uint32_t* data, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x)
    data[i] = device_word(i, seed);
}

__global__ void spin_kernel(const volatile std::uint32_t* flag, std::uint32_t* timed_out, std::uint64_t timeout_ns) {
  const std::uint64_t end = now_ns() + timeout_ns;
  std::uint32_t late = 0;
  while (*flag == 0) {
    if (now_ns() > end) {
      late = 1;
      break;
    }
  }
  *timed_out = late;
  __threadfence_system();
}

__global__ void sleep_kernel(std::uint64_t ns) {
  const std::uint64_t end = now_ns() + ns;
  while (now_ns() < end) __nanosleep(1000);
}

__global__ void write_kernel(std::uint32_t* where, std::uint32_t value) {
  *reinterpret_cast<volatile std::uint32_t*>(where) = value;
  __threadfence_system();
}

__global__ void fault_kernel(std::uint32_t* null) { null[threadIdx.x] = 1; }

__global__ void fill_bf16_kernel(std::uint16_t* data, std::size_t n, std::uint32_t seed, float amplitude) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const float unit = static_cast<float>(device_word(i, seed) >> 8) * 0x1p-24f;  // [0, 1)
    const unsigned bits = __float_as_uint((2.0f * unit - 1.0f) * amplitude);
    data[i] = static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}

__global__ void fill_weights_kernel(std::uint16_t* data, std::int64_t rows, std::int64_t cols, std::uint32_t seed) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    data[i] = weight_bf16(seed, i / cols, i % cols);
}

}  // namespace

cudaError_t fill_words(std::uint32_t* data, std::size_t n, std::uint32_t seed, cudaStream_t s) {
  fill_kernel<<<1024, 256, 0, s>>>(data, n, seed);
  return cudaGetLastError();
}

cudaError_t spin_until(const volatile std::uint32_t* flag, std::uint32_t* timed_out, std::uint64_t timeout_ns,
                       cudaStream_t s) {
  spin_kernel<<<1, 1, 0, s>>>(flag, timed_out, timeout_ns);
  return cudaGetLastError();
}

cudaError_t sleep_for(std::uint64_t ns, cudaStream_t s) {
  sleep_kernel<<<1, 1, 0, s>>>(ns);
  return cudaGetLastError();
}

cudaError_t write_value(std::uint32_t* where, std::uint32_t value, cudaStream_t s) {
  write_kernel<<<1, 1, 0, s>>>(where, value);
  return cudaGetLastError();
}

cudaError_t fault(cudaStream_t s) {
  fault_kernel<<<1, 32, 0, s>>>(nullptr);
  return cudaGetLastError();
}

cudaError_t fill_bf16(std::uint16_t* data, std::size_t n, std::uint32_t seed, float amplitude, cudaStream_t s) {
  fill_bf16_kernel<<<1024, 256, 0, s>>>(data, n, seed, amplitude);
  return cudaGetLastError();
}

void fuse(const shardline::cuda::fuse_copy* copies, std::size_t n, cudaStream_t s) {
  shardline::cuda::enqueue_fuse(std::span<const shardline::cuda::fuse_copy>(copies, n), s);
}

cudaError_t fill_weights_bf16(std::uint16_t* data, std::int64_t rows, std::int64_t cols, std::uint32_t seed,
                              cudaStream_t s) {
  fill_weights_kernel<<<2048, 256, 0, s>>>(data, rows, cols, seed);
  return cudaGetLastError();
}

}  // namespace gpu_test
