// Tiny kernels for the GPU suite and the CUDA benchmarks (gpu_kernels.cu, built with nvcc
// -arch=sm_90). Each launcher returns the launch's error (cudaGetLastError).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace shardline::cuda {
struct fuse_copy;
}

namespace gpu_test {

/// The word fill_words writes at index i: a hash of i and seed, never constant.
inline std::uint32_t word(std::size_t i, std::uint32_t seed) {
  std::uint64_t x = (static_cast<std::uint64_t>(i) << 32 | seed) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  return static_cast<std::uint32_t>(x >> 32);
}

/// data[i] = word(i, seed) for i < n.
cudaError_t fill_words(std::uint32_t* data, std::size_t n, std::uint32_t seed, cudaStream_t s);

/// One thread spins until *flag (host memory mapped into the device) is non-zero, or
/// `timeout_ns` passed; then it writes 1 to *timed_out in the second case, 0 otherwise.
cudaError_t spin_until(const volatile std::uint32_t* flag, std::uint32_t* timed_out,
                       std::uint64_t timeout_ns, cudaStream_t s);

/// One thread sleeps `ns` nanoseconds of the GPU's global timer.
cudaError_t sleep_for(std::uint64_t ns, cudaStream_t s);

/// *where = value, made visible to the host (for mapped host memory).
cudaError_t write_value(std::uint32_t* where, std::uint32_t value, cudaStream_t s);

/// Writes through a null pointer: the device faults (a sticky error, the context is lost).
cudaError_t fault(cudaStream_t s);

/// data[i] = bf16 of a weight-like value in [-amplitude, amplitude), a hash of i and seed.
cudaError_t fill_bf16(std::uint16_t* data, std::size_t n, std::uint32_t seed, float amplitude, cudaStream_t s);

/// shardline::cuda::enqueue_fuse(copies[0..n), s) (shardline/cuda/fuse.cuh), throwing as it does.
void fuse(const shardline::cuda::fuse_copy* copies, std::size_t n, cudaStream_t s);

}  // namespace gpu_test
