// cuda_quant_vs_copy: the GPU loaders' throughput against plain copies of the same bytes, in
// one run, timed with CUDA events, median of --reps repetitions after a warm-up.
//
//   bench_cuda_quant_vs_copy [--reps N] [--json]
//
//  cuda.quant_vs_copy       bf16 -> fp8 e4m3 with 128 x 128 block scales (cuda::enqueue_fuse of
//                           whole tensors, one launch) vs cudaMemcpyAsync device-to-device of
//                           the same bf16 bytes, tensor by tensor: >= 4 GiB of bf16 in
//                           DeepSeek-V3-like weight shapes. GB/s of bf16 input; goal ratio >= 0.7.
//  cuda.fuse_vs_memcpy2d    a tensor-parallel rank's slices of a Llama-3-8B-like model (32
//                           layers, tp 8: q/k/v -> qkv, gate/up -> gate_up by rows, o_proj and
//                           down_proj by columns; 224 copies) placed by one fuse launch vs one
//                           cudaMemcpy2DAsync per shard. GB/s of bytes placed.
//  cuda.fuse_quant_vs_fuse  the same slices quantized to fp8 while placed (one launch) vs
//                           placed in bf16 alone; the table also shows placing in bf16 and then
//                           quantizing the fused tensors (two passes). GB/s of bf16 read.
// With no usable GPU it says so on stderr and exits 0 (so `bench/run all` goes on).
#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/fp8.hpp>
#include <shardline/cuda/fuse.hpp>
#include <shardline/cuda/stream.hpp>

#include <gpu_kernels.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace cuda = shardline::cuda;
namespace sl = shardline;

namespace {

struct shape {
  std::int64_t rows, cols;
};

// Bump allocation from one device buffer, 256-byte aligned, as a loader's staging would be.
class arena {
public:
  explicit arena(std::size_t bytes) : memory_(bytes, 0) {}
  std::byte* take(std::size_t bytes) {
    std::byte* p = memory_.data() + used_;
    used_ += (bytes + 255) / 256 * 256;
    if (used_ > memory_.size()) {
      std::fprintf(stderr, "bench_cuda_quant_vs_copy: arena too small\n");
      std::exit(1);
    }
    return p;
  }
  std::byte* data() const { return memory_.data(); }
  std::size_t used() const { return used_; }

private:
  cuda::device_buffer memory_;
  std::size_t used_ = 0;
};

std::size_t padded(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct variant {
  const char* label;
  double bytes;  // counted per repetition, for GB/s
  std::function<void(cudaStream_t)> enqueue;
  std::vector<double> ms = {};
  std::vector<double> host_us = {};
};

// Runs every variant once to warm up, then `reps` rounds, interleaved.
void measure(std::vector<variant>& variants, int reps, const cuda::stream& s) {
  cuda::event start(0, cudaEventDefault), stop(0, cudaEventDefault);
  for (auto& v : variants) v.enqueue(s.native_handle());
  s.synchronize();
  for (int r = 0; r < reps; ++r)
    for (auto& v : variants) {
      start.record(s);
      const auto t0 = std::chrono::steady_clock::now();
      v.enqueue(s.native_handle());
      const auto t1 = std::chrono::steady_clock::now();
      stop.record(s);
      stop.synchronize();
      v.ms.push_back(elapsed_ms(start, stop));
      v.host_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
}

double gbps(const variant& v) { return v.bytes / (median(v.ms) * 1e-3) / 1e9; }

void print(FILE* out, const char* title, const std::vector<variant>& variants) {
  std::fprintf(out, "%s\n  %-52s %10s %10s %10s %14s\n", title, "variant", "GB", "median ms", "GB/s", "host enqueue us");
  for (const auto& v : variants)
    std::fprintf(out, "  %-52s %10.3f %10.3f %10.1f %14.1f\n", v.label, v.bytes / 1e9, median(v.ms), gbps(v),
                 median(v.host_us));
}

void json(const char* name, const variant& value, const variant& baseline) {
  std::printf("{\"name\":\"%s\",\"value\":%.1f,\"unit\":\"GB/s\",\"baseline\":%.1f,\"ratio\":%.3f}\n", name,
              gbps(value), gbps(baseline), gbps(value) / gbps(baseline));
}

void check(cudaError_t e, const char* what) { cuda::throw_if(e, what); }

}  // namespace

int main(int argc, char** argv) {
  int reps = 15;
  bool as_json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") as_json = true;
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: bench_cuda_quant_vs_copy [--reps N] [--json]\n");
      return 2;
    }
  }
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_quant_vs_copy: skipped: no GPU (%s)\n", cuda::unavailable_reason().c_str());
    return 0;
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  cuda::stream s(0);
  FILE* table = as_json ? stderr : stdout;

  // ---- quantize vs copy: whole tensors, DeepSeek-V3-like shapes, >= 4 GiB of bf16 --------------
  const std::vector<shape> layer = {{18432, 7168}, {18432, 7168}, {7168, 18432}, {7168, 16384}, {1536, 7168},
                                    {576, 7168},   {24576, 1536}, {7168, 2048},  {2048, 7168}};
  std::vector<shape> tensors;
  std::size_t bf16_bytes = 0;
  while (bf16_bytes < (std::size_t{4} << 30))
    for (const shape& t : layer) {
      tensors.push_back(t);
      bf16_bytes += padded(static_cast<std::size_t>(t.rows * t.cols) * 2);
    }
  std::size_t scale_bytes = 0;
  for (const shape& t : tensors) {
    const auto sh = cuda::fp8_scale_shape("w", {t.rows, t.cols});
    scale_bytes += padded(static_cast<std::size_t>(sh[0] * sh[1]) * 4);
  }
  arena source(bf16_bytes), copy_out(bf16_bytes), fp8_out(bf16_bytes / 2 + tensors.size() * 256),
      scales(scale_bytes);
  check(gpu_test::fill_bf16(reinterpret_cast<std::uint16_t*>(source.data()), bf16_bytes / 2, 1, 0.05f,
                            s.native_handle()),
        "fill_bf16");
  std::vector<cuda::fuse_copy> quantize;
  struct plain_copy {
    void* to;
    const void* from;
    std::size_t bytes;
  };
  std::vector<plain_copy> copies;
  double input_bytes = 0;
  for (const shape& t : tensors) {
    const std::size_t n = static_cast<std::size_t>(t.rows * t.cols);
    const auto sh = cuda::fp8_scale_shape("w", {t.rows, t.cols});
    std::byte* in = source.take(n * 2);
    quantize.push_back(cuda::whole({"w", in, sl::dtype::bf16, t.rows, t.cols},
                                   {"w_fp8", fp8_out.take(n), sl::dtype::f8_e4m3, t.rows, t.cols, 0,
                                    reinterpret_cast<float*>(scales.take(static_cast<std::size_t>(sh[0] * sh[1]) * 4))}));
    copies.push_back({copy_out.take(n * 2), in, n * 2});
    input_bytes += static_cast<double>(n * 2);
  }
  std::vector<variant> quant = {
      {"quantize bf16 -> fp8 e4m3, 128x128 scales (1 launch)", input_bytes,
       [&](cudaStream_t st) { gpu_test::fuse(quantize.data(), quantize.size(), st); }},
      {"cudaMemcpyAsync device-to-device, per tensor", input_bytes,
       [&](cudaStream_t st) {
         for (const auto& c : copies) check(cudaMemcpyAsync(c.to, c.from, c.bytes, cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync");
       }},
  };
  measure(quant, reps, s);
  char title[1024];
  std::snprintf(title, sizeof title, "cuda_quant_vs_copy on %s (%d SMs): %zu tensors, %.2f GiB of bf16, %d reps:",
                prop.name, prop.multiProcessorCount, tensors.size(), input_bytes / (1u << 30), reps);
  print(table, title, quant);
  std::fprintf(table, "  ratio quantize / copy (GB/s of bf16 input): %.3f (goal >= 0.7)\n\n", gbps(quant[0]) / gbps(quant[1]));

  // ---- TP slices into fused layouts: fuse kernel vs cudaMemcpy2DAsync; fp8 while placing --------
  constexpr std::int64_t hidden = 4096, kv = 1024, inter = 14336, layers = 32, tp = 8, rank = 3;
  std::size_t source_bytes = 0, slice_bytes = 0;
  const std::vector<shape> per_layer = {{hidden, hidden}, {kv, hidden}, {kv, hidden}, {inter, hidden},
                                        {inter, hidden},  {hidden, hidden}, {hidden, inter}};
  for (const shape& t : per_layer) source_bytes += padded(static_cast<std::size_t>(t.rows * t.cols) * 2);
  source_bytes *= layers;
  slice_bytes = source_bytes / tp + 4096 * layers;
  arena model(source_bytes), placed(slice_bytes), placed_fp8(slice_bytes / 2 + 4096 * layers), fused_scales(64 << 20);
  check(gpu_test::fill_bf16(reinterpret_cast<std::uint16_t*>(model.data()), source_bytes / 2, 2, 0.05f, s.native_handle()),
        "fill_bf16");
  std::vector<cuda::fuse_copy> place, place_fp8, quantize_placed;
  double placed_bytes = 0;
  for (std::int64_t l = 0; l < layers; ++l) {
    std::vector<cuda::source_matrix> m;
    for (const shape& t : per_layer)
      m.push_back({"w", model.take(static_cast<std::size_t>(t.rows * t.cols) * 2), sl::dtype::bf16, t.rows, t.cols});
    const auto add = [&](std::vector<cuda::fuse_copy> bf16, std::vector<cuda::fuse_copy> fp8, std::int64_t rows,
                         std::int64_t cols, std::byte* bf16_out) {
      for (auto& c : bf16) {
        place.push_back(c);
        placed_bytes += static_cast<double>(c.rows * c.cols * 2);
      }
      for (auto& c : fp8) place_fp8.push_back(c);
      quantize_placed.push_back(cuda::whole({"fused", bf16_out, sl::dtype::bf16, rows, cols}, fp8.front().destination));
    };
    const auto destinations = [&](std::int64_t rows, std::int64_t cols, std::byte*& bf16_out) {
      bf16_out = placed.take(static_cast<std::size_t>(rows * cols) * 2);
      const auto sh = cuda::fp8_scale_shape("w", {rows, cols});
      return std::pair{
          cuda::destination_matrix{"fused", bf16_out, sl::dtype::bf16, rows, cols},
          cuda::destination_matrix{"fused_fp8", placed_fp8.take(static_cast<std::size_t>(rows * cols)), sl::dtype::f8_e4m3,
                                   rows, cols, 0,
                                   reinterpret_cast<float*>(fused_scales.take(static_cast<std::size_t>(sh[0] * sh[1]) * 4))}};
    };
    std::byte* out = nullptr;
    // Rows: q/k/v -> qkv, gate/up -> gate_up.
    for (auto [first, count, rows] : {std::tuple{0, 3, (hidden + 2 * kv) / tp}, std::tuple{3, 2, 2 * inter / tp}}) {
      auto [d, d8] = destinations(rows, hidden, out);
      const std::vector<cuda::source_matrix> members(m.begin() + first, m.begin() + first + count);
      add(cuda::stack_row_slices(members, tp, rank, d), cuda::stack_row_slices(members, tp, rank, d8), rows, hidden, out);
    }
    // Columns: o_proj [hidden, hidden] and down_proj [hidden, inter] -> [hidden, cols / tp].
    for (int i : {5, 6}) {
      const std::int64_t cols = m[i].cols / tp;
      auto [d, d8] = destinations(hidden, cols, out);
      add({{m[i], 0, rank * cols, hidden, cols, d, 0, 0}}, {{m[i], 0, rank * cols, hidden, cols, d8, 0, 0}}, hidden,
          cols, out);
    }
  }
  std::vector<variant> fuse = {
      {"fuse kernel, bf16 (1 launch)", placed_bytes,
       [&](cudaStream_t st) { gpu_test::fuse(place.data(), place.size(), st); }},
      {"cudaMemcpy2DAsync per shard", placed_bytes,
       [&](cudaStream_t st) {
         for (const auto& c : place) {
           const auto sp = static_cast<std::size_t>(c.source.cols * 2), dp = static_cast<std::size_t>(c.destination.cols * 2);
           check(cudaMemcpy2DAsync(static_cast<std::byte*>(c.destination.data) + c.destination_row * dp + c.destination_col * 2, dp,
                                   static_cast<const std::byte*>(c.source.data) + c.source_row * sp + c.source_col * 2, sp,
                                   static_cast<std::size_t>(c.cols * 2), static_cast<std::size_t>(c.rows),
                                   cudaMemcpyDeviceToDevice, st),
                 "cudaMemcpy2DAsync");
         }
       }},
      {"fuse + quantize to fp8 while placing (1 launch)", placed_bytes,
       [&](cudaStream_t st) { gpu_test::fuse(place_fp8.data(), place_fp8.size(), st); }},
      {"fuse bf16, then quantize the fused tensors (2 launches)", placed_bytes,
       [&](cudaStream_t st) {
         gpu_test::fuse(place.data(), place.size(), st);
         gpu_test::fuse(quantize_placed.data(), quantize_placed.size(), st);
       }},
  };
  measure(fuse, reps, s);
  std::snprintf(title, sizeof title,
                "tp rank %lld of %lld of a Llama-3-8B-like model (%lld layers, %zu copies), into fused layouts, %d reps:",
                static_cast<long long>(rank), static_cast<long long>(tp), static_cast<long long>(layers), place.size(), reps);
  print(table, title, fuse);
  std::fprintf(table, "  ratio fuse kernel / cudaMemcpy2DAsync: %.3f; fused fp8 / bf16 fuse: %.3f\n",
               gbps(fuse[0]) / gbps(fuse[1]), gbps(fuse[2]) / gbps(fuse[0]));

  if (as_json) {
    json("cuda.quant_vs_copy", quant[0], quant[1]);
    json("cuda.fuse_vs_memcpy2d", fuse[0], fuse[1]);
    json("cuda.fuse_quant_vs_fuse", fuse[2], fuse[0]);
  }
  return 0;
}
