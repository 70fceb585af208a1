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

#ifdef __CUDACC__
#define GPU_TEST_HOST_DEVICE __host__ __device__
#else
#define GPU_TEST_HOST_DEVICE
#endif

/// A 64-bit finalizer (splitmix64's): every input bit moves every output bit.
GPU_TEST_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// The bf16 bits fill_weights_bf16 writes at (row, col): integers only, so the host computes
/// exactly what the GPU wrote. Never zero; the magnitude of each 128 x 128 block is drawn
/// from 2^-3 .. 2^-8 by the block, so fp8 block scales differ from block to block, and the
/// elements of a block spread over 6 binades below it, as trained weights do.
GPU_TEST_HOST_DEVICE inline std::uint16_t weight_bf16(std::uint32_t seed, std::int64_t row, std::int64_t col) {
  const std::uint64_t block =
      mix64(static_cast<std::uint64_t>(seed) << 42 ^ static_cast<std::uint64_t>(row >> 7) << 21 ^
            static_cast<std::uint64_t>(col >> 7));
  const std::uint64_t h = mix64((static_cast<std::uint64_t>(seed) << 40 ^ static_cast<std::uint64_t>(row) << 20 ^
                                 static_cast<std::uint64_t>(col)) * 0x9E3779B97F4A7C15ull);
  const unsigned top = 124u - static_cast<unsigned>(block % 6);  // 2^(top - 127)
  const unsigned exponent = top - static_cast<unsigned>((h >> 8) % 6);
  return static_cast<std::uint16_t>((h >> 63) << 15 | exponent << 7 | (h & 0x7fu));
}

/// data[r * cols + c] = weight_bf16(seed, r, c) for a dense row-major rows x cols bf16 tensor.
cudaError_t fill_weights_bf16(std::uint16_t* data, std::int64_t rows, std::int64_t cols, std::uint32_t seed,
                              cudaStream_t s);

}  // namespace gpu_test
