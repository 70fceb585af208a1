// shardline/cuda/fuse.cuh: GPU loaders for fused layouts. One launch places a batch of
// tensor-parallel slices into their fused destinations (q/k/v -> qkv_proj, gate/up ->
// gate_up_proj), quantizing bf16 -> fp8 e4m3 with per-block scales on the way where the
// destination is f8_e4m3. Include it from a translation unit nvcc compiles (C++20, sm_89 or
// later for the e4m3 conversion instruction; -arch=sm_90 on Hopper); the descriptors, their
// checks and the CPU reference are in fuse.hpp and fp8.hpp, which need no CUDA.
#pragma once

#include <shardline/cuda/detail/handles.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/fp8.hpp>
#include <shardline/cuda/fuse.hpp>

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

namespace shardline::cuda {

namespace detail {

inline constexpr int fuse_threads = 256;

// One same-dtype copy, in bytes, cut into tiles of about 64 KiB: `rows_per_tile` rows of
// `chunk_bytes` each (long rows are cut across too, so no tile is much larger than that).
struct copy_job {
  const std::byte* source;  // the slice's first byte
  std::byte* destination;   // where it lands
  std::int64_t source_pitch;
  std::int64_t destination_pitch;
  std::int64_t rows;
  std::int64_t row_bytes;
  std::int64_t chunk_bytes;
  std::int64_t first_tile;  // tiles of the launch before this job's
  std::int32_t rows_per_tile;
  std::int32_t chunks;  // tiles across a row
  std::int32_t vector;  // bytes per access: 16, 8, 4, 2 or 1
};

// One bf16 -> e4m3 copy; a tile is one scale block of the destination.
struct quantize_job {
  const std::uint16_t* source;  // the slice's first element
  std::uint8_t* destination;
  float* scales;  // the scale of the block holding `destination`'s first element
  std::int64_t source_pitch;       // elements
  std::int64_t destination_pitch;  // bytes
  std::int64_t scale_pitch;        // floats
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t first_tile;
  std::int32_t block_rows;
  std::int32_t block_cols;
  std::int32_t col_blocks;
  std::int32_t vector;  // elements per access: 8 (16-byte loads) or 1
};

// The jobs travel as the kernel's parameter: no device memory to allocate, fill or keep
// alive, and a launch is capturable into a graph. Volta and later take 32 KiB of parameters
// (CUDA 12.1+); a small batch gets a small instantiation, so a launch of a few copies does
// not ship 32 KiB.
template <class Job, int Capacity>
struct job_batch {
  Job jobs[Capacity];
  int count;
};

inline constexpr int small_batch = 16;
template <class Job>
inline constexpr int large_batch = static_cast<int>((32000 - 64) / sizeof(Job));
static_assert(sizeof(job_batch<copy_job, large_batch<copy_job>>) + 8 <= 32764);
static_assert(sizeof(job_batch<quantize_job, large_batch<quantize_job>>) + 8 <= 32764);

// The job holding tile `t`: the last whose first_tile <= t (a CTA-uniform binary search).
template <class Batch>
__device__ inline int job_of(const Batch& b, std::int64_t t) {
  int lo = 0, hi = b.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (b.jobs[mid].first_tile <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <class V>
__device__ inline void copy_tile(const std::byte* __restrict__ source, std::byte* __restrict__ destination,
                                 std::int64_t source_pitch, std::int64_t destination_pitch, int rows, int bytes) {
  const unsigned per_row = static_cast<unsigned>(bytes) / sizeof(V);
  const unsigned n = static_cast<unsigned>(rows) * per_row;
  constexpr int unroll = 4;  // loads in flight per thread before the first store
  for (unsigned base = threadIdx.x; base < n; base += blockDim.x * unroll) {
    V v[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const unsigned i = base + u * blockDim.x;
      if (i < n) v[u] = *reinterpret_cast<const V*>(source + (i / per_row) * source_pitch + (i % per_row) * sizeof(V));
    }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const unsigned i = base + u * blockDim.x;
      if (i < n) *reinterpret_cast<V*>(destination + (i / per_row) * destination_pitch + (i % per_row) * sizeof(V)) = v[u];
    }
  }
}

template <int Capacity>
__global__ void __launch_bounds__(fuse_threads) copy_kernel(const job_batch<copy_job, Capacity> batch, std::int64_t tiles) {
  for (std::int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const copy_job& j = batch.jobs[job_of(batch, t)];
    const std::int64_t local = t - j.first_tile;
    const std::int64_t row = local / j.chunks * j.rows_per_tile, col = local % j.chunks * j.chunk_bytes;
    const int rows = static_cast<int>(min(static_cast<std::int64_t>(j.rows_per_tile), j.rows - row));
    const int bytes = static_cast<int>(min(j.chunk_bytes, j.row_bytes - col));
    const std::byte* s = j.source + row * j.source_pitch + col;
    std::byte* d = j.destination + row * j.destination_pitch + col;
    switch (j.vector) {
      case 16: copy_tile<uint4>(s, d, j.source_pitch, j.destination_pitch, rows, bytes); break;
      case 8: copy_tile<uint2>(s, d, j.source_pitch, j.destination_pitch, rows, bytes); break;
      case 4: copy_tile<unsigned>(s, d, j.source_pitch, j.destination_pitch, rows, bytes); break;
      case 2: copy_tile<unsigned short>(s, d, j.source_pitch, j.destination_pitch, rows, bytes); break;
      default: copy_tile<unsigned char>(s, d, j.source_pitch, j.destination_pitch, rows, bytes); break;
    }
  }
}

// bf16 bits -> float, exactly.
__device__ inline float low_bf16(unsigned w) { return __uint_as_float(w << 16); }
__device__ inline float high_bf16(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// The largest finite magnitude (fp8.hpp's counts_for_amax: NaN and infinities left out).
__device__ inline float amax_with(float amax, float v) {
  const float a = fabsf(v);
  return a <= FLT_MAX ? fmaxf(amax, a) : amax;
}
__device__ inline float amax_of(float amax, unsigned w) { return amax_with(amax_with(amax, low_bf16(w)), high_bf16(w)); }
__device__ inline float amax_of(float amax, uint4 v) {
  return amax_of(amax_of(amax_of(amax_of(amax, v.x), v.y), v.z), v.w);
}
__device__ inline float amax_of(float amax, unsigned short v) { return amax_with(amax, low_bf16(v)); }

// Two bf16 (one word) -> two e4m3 (low byte: the low element), saturating, round to nearest even.
__device__ inline unsigned short to_e4m3x2(unsigned w, float m) {
  const float2 f = make_float2(__fmul_rn(low_bf16(w), m), __fmul_rn(high_bf16(w), m));
  return __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
}
__device__ inline uint2 to_e4m3(uint4 v, float m) {
  return make_uint2(to_e4m3x2(v.x, m) | static_cast<unsigned>(to_e4m3x2(v.y, m)) << 16,
                    to_e4m3x2(v.z, m) | static_cast<unsigned>(to_e4m3x2(v.w, m)) << 16);
}
__device__ inline unsigned char to_e4m3(unsigned short v, float m) {
  return __nv_cvt_float_to_fp8(__fmul_rn(low_bf16(v), m), __NV_SATFINITE, __NV_E4M3);
}

// The maximum over the CTA, in every thread. `shared` holds a value per warp.
__device__ inline float cta_max(float v, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();  // the previous block's readers are done with `shared`
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x % 32 < blockDim.x / 32 ? shared[threadIdx.x % 32] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One scale block: `rows` x `vectors` accesses of V elements. The first `cached` accesses of
// each thread stay in registers between the amax pass and the conversion pass (all of a
// 128 x 128 block with 16-byte accesses), so the block is read from memory once.
template <int V>
__device__ inline float quantize_block(const std::uint16_t* __restrict__ source, std::uint8_t* __restrict__ destination,
                                       std::int64_t source_pitch, std::int64_t destination_pitch, int rows, int cols,
                                       float* shared) {
  using load = std::conditional_t<V == 8, uint4, unsigned short>;
  using store = std::conditional_t<V == 8, uint2, unsigned char>;
  constexpr int cached = 8;
  const unsigned per_row = static_cast<unsigned>(cols) / V, n = static_cast<unsigned>(rows) * per_row;
  const auto in = [&](unsigned i) {
    return *reinterpret_cast<const load*>(source + (i / per_row) * source_pitch + (i % per_row) * V);
  };
  const auto out = [&](unsigned i) {
    return reinterpret_cast<store*>(destination + (i / per_row) * destination_pitch + (i % per_row) * V);
  };
  load cache[cached];
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < cached; ++k) {
    const unsigned i = threadIdx.x + k * blockDim.x;
    if (i < n) {
      cache[k] = in(i);
      amax = amax_of(amax, cache[k]);
    }
  }
  for (unsigned i = threadIdx.x + cached * blockDim.x; i < n; i += blockDim.x) amax = amax_of(amax, in(i));
  // fp8_scale_for, with the same correctly rounded divisions.
  const float a = fmaxf(cta_max(amax, shared), fp8_min_amax);
  const float multiplier = __fdiv_rn(e4m3::max, a);
#pragma unroll
  for (int k = 0; k < cached; ++k) {
    const unsigned i = threadIdx.x + k * blockDim.x;
    if (i < n) *out(i) = to_e4m3(cache[k], multiplier);
  }
  for (unsigned i = threadIdx.x + cached * blockDim.x; i < n; i += blockDim.x) *out(i) = to_e4m3(in(i), multiplier);
  return __fdiv_rn(a, e4m3::max);
}

template <int Capacity>
__global__ void __launch_bounds__(fuse_threads)
    quantize_kernel(const job_batch<quantize_job, Capacity> batch, std::int64_t tiles) {
  __shared__ float shared[fuse_threads / 32];
  for (std::int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const quantize_job& j = batch.jobs[job_of(batch, t)];
    const std::int64_t local = t - j.first_tile;
    const std::int64_t block_row = local / j.col_blocks, block_col = local % j.col_blocks;
    const std::int64_t row = block_row * j.block_rows, col = block_col * j.block_cols;
    const int rows = static_cast<int>(min(static_cast<std::int64_t>(j.block_rows), j.rows - row));
    const int cols = static_cast<int>(min(static_cast<std::int64_t>(j.block_cols), j.cols - col));
    const std::uint16_t* s = j.source + row * j.source_pitch + col;
    std::uint8_t* d = j.destination + row * j.destination_pitch + col;
    const float inverse = j.vector == 8 ? quantize_block<8>(s, d, j.source_pitch, j.destination_pitch, rows, cols, shared)
                                        : quantize_block<1>(s, d, j.source_pitch, j.destination_pitch, rows, cols, shared);
    if (threadIdx.x == 0) j.scales[block_row * j.scale_pitch + block_col] = inverse;
  }
}

inline bool aligned_to(std::uintptr_t bits, std::int64_t alignment) {
  return bits % static_cast<std::uintptr_t>(alignment) == 0;
}

inline copy_job make_copy_job(const fuse_copy& c) {
  const auto e = static_cast<std::int64_t>(size_of(c.source.type));
  const std::int64_t sp = pitch_of(c.source.row_stride, c.source.cols) * e;
  const std::int64_t dp = pitch_of(c.destination.row_stride, c.destination.cols) * e;
  copy_job j{};
  j.source = static_cast<const std::byte*>(c.source.data) + c.source_row * sp + c.source_col * e;
  j.destination = static_cast<std::byte*>(c.destination.data) + c.destination_row * dp + c.destination_col * e;
  j.source_pitch = sp;
  j.destination_pitch = dp;
  j.rows = c.rows;
  j.row_bytes = c.cols * e;
  const std::uintptr_t bits = reinterpret_cast<std::uintptr_t>(j.source) | reinterpret_cast<std::uintptr_t>(j.destination) |
                              static_cast<std::uintptr_t>(sp) | static_cast<std::uintptr_t>(dp) |
                              static_cast<std::uintptr_t>(j.row_bytes);
  j.vector = 16;
  while (!aligned_to(bits, j.vector)) j.vector /= 2;
  constexpr std::int64_t tile_bytes = 64 << 10;
  if (j.row_bytes <= tile_bytes) {
    j.chunks = 1;
    j.chunk_bytes = j.row_bytes;
    j.rows_per_tile = static_cast<std::int32_t>(tile_bytes / j.row_bytes);
  } else {
    j.rows_per_tile = 1;
    j.chunks = static_cast<std::int32_t>((j.row_bytes + tile_bytes - 1) / tile_bytes);
    const std::int64_t even = (j.row_bytes + j.chunks - 1) / j.chunks;
    j.chunk_bytes = (even + j.vector - 1) / j.vector * j.vector;
  }
  return j;
}

inline std::int64_t tiles_of(const copy_job& j) {
  return (j.rows + j.rows_per_tile - 1) / j.rows_per_tile * j.chunks;
}

inline quantize_job make_quantize_job(const fuse_copy& c) {
  const destination_matrix& d = c.destination;
  const std::int64_t sp = pitch_of(c.source.row_stride, c.source.cols), dp = pitch_of(d.row_stride, d.cols);
  quantize_job j{};
  j.source = static_cast<const std::uint16_t*>(c.source.data) + c.source_row * sp + c.source_col;
  j.destination = static_cast<std::uint8_t*>(d.data) + c.destination_row * dp + c.destination_col;
  j.scale_pitch = (d.cols + d.block.cols - 1) / d.block.cols;
  j.scales = d.scales + c.destination_row / d.block.rows * j.scale_pitch + c.destination_col / d.block.cols;
  j.source_pitch = sp;
  j.destination_pitch = dp;
  j.rows = c.rows;
  j.cols = c.cols;
  j.block_rows = static_cast<std::int32_t>(d.block.rows);
  j.block_cols = static_cast<std::int32_t>(d.block.cols);
  j.col_blocks = static_cast<std::int32_t>((c.cols + d.block.cols - 1) / d.block.cols);
  const bool wide = aligned_to(reinterpret_cast<std::uintptr_t>(j.source), 16) && aligned_to(sp * 2, 16) &&
                    aligned_to(reinterpret_cast<std::uintptr_t>(j.destination), 8) && aligned_to(dp, 8) &&
                    c.cols % 8 == 0 && d.block.cols % 8 == 0;
  j.vector = wide ? 8 : 1;
  return j;
}

inline std::int64_t tiles_of(const quantize_job& j) {
  return (j.rows + j.block_rows - 1) / j.block_rows * j.col_blocks;
}

// Launches `jobs` in batches of the kernel's capacity; returns the first launch error.
template <class Job, template <int> class Launch>
cudaError_t launch_batches(std::vector<Job>& jobs, cudaStream_t stream) {
  for (std::size_t first = 0; first < jobs.size();) {
    const std::size_t count = std::min(jobs.size() - first, static_cast<std::size_t>(large_batch<Job>));
    std::int64_t tiles = 0;
    for (std::size_t i = first; i < first + count; ++i) {
      jobs[i].first_tile = tiles;
      tiles += tiles_of(jobs[i]);
    }
    const auto grid = static_cast<unsigned>(std::min<std::int64_t>(tiles, INT_MAX));
    const cudaError_t e = count <= small_batch ? Launch<small_batch>::run(jobs.data() + first, count, grid, tiles, stream)
                                               : Launch<large_batch<Job>>::run(jobs.data() + first, count, grid, tiles, stream);
    if (e != cudaSuccess) return e;
    first += count;
  }
  return cudaSuccess;
}

template <int Capacity>
struct launch_copy {
  static cudaError_t run(const copy_job* jobs, std::size_t count, unsigned grid, std::int64_t tiles, cudaStream_t s) {
    job_batch<copy_job, Capacity> b{};
    std::copy(jobs, jobs + count, b.jobs);
    b.count = static_cast<int>(count);
    copy_kernel<Capacity><<<grid, fuse_threads, 0, s>>>(b, tiles);
    return cudaGetLastError();
  }
};

template <int Capacity>
struct launch_quantize {
  static cudaError_t run(const quantize_job* jobs, std::size_t count, unsigned grid, std::int64_t tiles, cudaStream_t s) {
    job_batch<quantize_job, Capacity> b{};
    std::copy(jobs, jobs + count, b.jobs);
    b.count = static_cast<int>(count);
    quantize_kernel<Capacity><<<grid, fuse_threads, 0, s>>>(b, tiles);
    return cudaGetLastError();
  }
};

inline std::error_code enqueue_fuse(std::span<const fuse_copy> copies, cudaStream_t stream, std::string& why) {
  std::error_code ec;
  why = check_fuse_copies(copies, ec);
  if (ec) return ec;
  std::vector<copy_job> copy_jobs;
  std::vector<quantize_job> quantize_jobs;
  for (std::size_t i = 0; i < copies.size(); ++i) {
    const fuse_copy& c = copies[i];
    if (c.destination.type != dtype::f8_e4m3) {
      copy_jobs.push_back(make_copy_job(c));
      continue;
    }
    // The kernel indexes a block's elements with 32-bit integers.
    if (c.destination.block.rows * c.destination.block.cols > INT_MAX) {
      why = describe_copy(c, i) + ": the scale block " + std::to_string(c.destination.block.rows) + " x " +
            std::to_string(c.destination.block.cols) + " has more than 2^31 - 1 elements";
      return make_error_code(errc::invalid_argument);
    }
    quantize_jobs.push_back(make_quantize_job(c));
  }
  int device = 0;
  cudaError_t e = cudaStreamGetDevice(stream, &device);
  if (e != cudaSuccess) {
    why = "enqueue_fuse: cudaStreamGetDevice";
    return make_error_code(e);
  }
  device_scope scope(device);
  if ((e = scope.error()) == cudaSuccess) e = launch_batches<copy_job, launch_copy>(copy_jobs, stream);
  if (e != cudaSuccess) {
    why = "enqueue_fuse: launching the copy kernel for " + std::to_string(copy_jobs.size()) + " copies on device " +
          std::to_string(device);
    return make_error_code(e);
  }
  if ((e = launch_batches<quantize_job, launch_quantize>(quantize_jobs, stream)) != cudaSuccess) {
    why = "enqueue_fuse: launching the fp8 quantize kernel for " + std::to_string(quantize_jobs.size()) +
          " copies on device " + std::to_string(device);
    return make_error_code(e);
  }
  return {};
}

}  // namespace detail

/// Enqueues `copies` on `stream` (fuse.hpp says what one does), in one kernel launch for the
/// same-dtype copies and one for the quantizing ones (more only past a few hundred copies a
/// kind: the descriptors travel as the kernel's parameter, so nothing is allocated and the
/// launches can be captured into a graph). Data and scales must be memory of the stream's
/// device (or memory it can access); they must stay alive, and sources unchanged, until the
/// work is done (cuda::async_wait(stream) says when). Returns once the work is enqueued.
///
/// Throws shardline::error before enqueuing anything when a copy is malformed
/// (check_fuse_copies' codes and messages, which name the copy, its source and destination),
/// or errc::invalid_argument for a scale block of more than 2^31 - 1 elements; a
/// cuda::error_category code, its message naming the kernel and device, when a launch fails
/// (the copies before it in the batch may then have been enqueued).
/// Thread safety: as the CUDA runtime's; each call touches only its copies' memory.
inline void enqueue_fuse(std::span<const fuse_copy> copies, cudaStream_t stream) {
  std::string why;
  const std::error_code ec = detail::enqueue_fuse(copies, stream, why);
  if (ec) throw error(ec, why);
}

/// The std::error_code overload: `ec` is set as enqueue_fuse would throw, cleared on success.
inline void enqueue_fuse(std::span<const fuse_copy> copies, cudaStream_t stream, std::error_code& ec) {
  std::string why;
  ec = detail::enqueue_fuse(copies, stream, why);
}

/// Quantizes (or copies, for a destination of the source's dtype) the whole of `source` into
/// `destination`: enqueue_fuse of the one copy whole(source, destination).
inline void enqueue_quantize(const source_matrix& source, const destination_matrix& destination, cudaStream_t stream) {
  const fuse_copy c = whole(source, destination);
  enqueue_fuse(std::span<const fuse_copy>(&c, 1), stream);
}

}  // namespace shardline::cuda
