// cuda_ipc: a full weight update over cuda::ipc_transport, sender and receiver in separate
// processes, against cudaMemcpyPeerAsync of the same bytes in the same run.
//
//   bench_cuda_ipc [--gib G] [--rounds R] [--vmm] [--json]
//
// The receiver (this executable again, started with posix_spawn before the parent touches
// CUDA) holds a Llama-style model in bf16 on the last GPU: embed_tokens and lm_head
// [128256, 4096] and as many layers (q, o [4096, 4096]; k, v [1024, 4096]; gate, up
// [14336, 4096]; down [4096, 14336]; two norms [4096]) as reach G GiB (default 8), one
// cudaMalloc per tensor as an engine's caching allocator gives big tensors segments of their
// own (with --vmm: every tensor in one VMM range of 20 MiB physical chunks created shareable
// as POSIX descriptors, as PyTorch's expandable segments). The sender holds the same tensors
// in one flat buffer on GPU 0 (a trainer's flat parameters) and pushes them:
//   ipc update      begin, then one write batch per layer (every batch in flight together),
//                   then commit: from the first write's initiation to the commit's
//                   acknowledgement by the receiver process, each round; the JSON value
//   cudaMemcpyPeer  cudaMemcpyPeerAsync of the same tensors from the same source into a
//                   buffer on the receiver's GPU allocated in this process, on one stream,
//                   until cudaStreamSynchronize returns; the JSON baseline
// Rounds alternate the two; the table shows each round, the JSON the medians' GB/s. After the
// last round the receiver checks the first, a middle and the last 64 KiB of every tensor.
// With one GPU both sides use it (the baseline is then a device-local cudaMemcpyAsync).
// With no usable GPU it says so on stderr and exits 0.
#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/ipc_transport.hpp>
#include <shardline/cuda/stream.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <gpu_kernels.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace sl = shardline;
namespace cuda = shardline::cuda;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

struct tensor {
  std::string name;
  std::size_t bytes;
  std::size_t layer;  // the write batch it travels in (embed: 0, layers 1..L, lm_head: L + 1)
};

std::vector<tensor> model(double gib) {
  const std::size_t h = 4096, kv = 1024, ffn = 14336, vocab = 128256, bf16 = 2;
  std::vector<tensor> t{{"model.embed_tokens.weight", vocab * h * bf16, 0}};
  std::size_t total = 2 * vocab * h * bf16;
  const auto target = static_cast<std::size_t>(gib * double(std::size_t(1) << 30));
  for (std::size_t l = 0; total < target; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (auto [n, b] : std::vector<std::pair<std::string, std::size_t>>{
             {"input_layernorm.weight", h},
             {"self_attn.q_proj.weight", h * h},
             {"self_attn.k_proj.weight", kv * h},
             {"self_attn.v_proj.weight", kv * h},
             {"self_attn.o_proj.weight", h * h},
             {"post_attention_layernorm.weight", h},
             {"mlp.gate_proj.weight", ffn * h},
             {"mlp.up_proj.weight", ffn * h},
             {"mlp.down_proj.weight", h * ffn}}) {
      t.push_back({p + n, b * bf16, l + 1});
      total += b * bf16;
    }
  }
  t.push_back({"lm_head.weight", vocab * h * bf16, t.back().layer + 1});
  return t;
}

std::size_t total_bytes(const std::vector<tensor>& t) {
  std::size_t n = 0;
  for (const auto& x : t) n += x.bytes;
  return n;
}

void check(cudaError_t e, const std::string& what) { cuda::throw_if(e, what); }

// PyTorch's expandable segments grow the large pool by 20 MiB chunks.
constexpr std::size_t vmm_chunk = std::size_t(20) << 20;

std::uint32_t seed_of(std::size_t i) { return static_cast<std::uint32_t>(i * 7919 + 1); }

// Whether `n` bytes at device pointer `p` hold fill_words(seed) from word `first` on.
bool sample_holds(const std::byte* p, std::size_t first_word, std::size_t words, std::uint32_t seed) {
  std::vector<std::uint32_t> got(words);
  check(cudaMemcpy(got.data(), p + first_word * 4, words * 4, cudaMemcpyDeviceToHost), "cudaMemcpy of a sample");
  for (std::size_t i = 0; i < words; ++i)
    if (got[i] != gpu_test::word(first_word + i, seed)) return false;
  return true;
}

// ---- the receiver process -----------------------------------------------------------------

int run_receiver(const std::string& path, double gib, bool vmm, int device, int rounds) {
  try {
    // Its GPU current for the whole process: the checks read VMM memory that only this device
    // was given access to.
    check(cudaSetDevice(device), "cudaSetDevice");
    const auto tensors = model(gib);
    asio::io_context io;
    cuda::ipc_options o;
    o.device = device;
    cuda::ipc_transport::receiver rx(io.get_executor(), path, o);
    std::vector<cuda::device_buffer> buffers;
    std::vector<std::byte*> where;
    // VMM: one range of shareable 2 MiB chunks holding every tensor, 256-byte aligned.
    CUdeviceptr range = 0;
    std::size_t range_bytes = 0;
    std::vector<CUmemGenericAllocationHandle> chunks;
    const auto& d = cuda::detail::driver();
    if (vmm) {
      std::size_t total = 0;
      for (const auto& t : tensors) total += (t.bytes + 255) / 256 * 256;
      const std::size_t chunk = vmm_chunk;
      range_bytes = (total + chunk - 1) / chunk * chunk;
      CUmemAllocationProp prop{};
      prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
      prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      prop.location.id = device;
      prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
      cuda::detail::context_scope scope(device);
      if (!d.available || d.address_reserve(&range, range_bytes, 0, 0, 0) != CUDA_SUCCESS)
        throw std::runtime_error("cuMemAddressReserve failed");
      for (std::size_t at = 0; at < range_bytes; at += chunk) {
        CUmemGenericAllocationHandle hnd = 0;
        if (d.create(&hnd, chunk, &prop, 0) != CUDA_SUCCESS || d.map(range + at, chunk, 0, hnd, 0) != CUDA_SUCCESS)
          throw std::runtime_error("cuMemCreate/cuMemMap failed");
        chunks.push_back(hnd);
      }
      CUmemAccessDesc access{};
      access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      access.location.id = device;
      access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      if (d.set_access(range, range_bytes, &access, 1) != CUDA_SUCCESS) throw std::runtime_error("cuMemSetAccess failed");
      std::size_t at = 0;
      for (const auto& t : tensors) {
        where.push_back(reinterpret_cast<std::byte*>(range + at));
        at += (t.bytes + 255) / 256 * 256;
      }
    } else {
      for (const auto& t : tensors) {
        buffers.emplace_back(t.bytes, device);
        where.push_back(buffers.back().data());
      }
    }
    const auto exposing = clock_type::now();
    for (std::size_t i = 0; i < tensors.size(); ++i)
      rx.expose({tensors[i].name, std::span(where[i], tensors[i].bytes), sl::memory_location::cuda(device), std::nullopt});
    const double expose_ms = std::chrono::duration<double, std::milli>(clock_type::now() - exposing).count();
    std::fprintf(stderr, "receiver: %zu tensors, %zu allocations exported (%zu VMM) in %.1f ms\n", tensors.size(),
                 rx.exported_allocations(), rx.exported_vmm_allocations(), expose_ms);
    bool accepted = false;
    rx.async_accept([&](std::error_code ec, std::uint32_t) {
      accepted = !ec;
      if (ec) std::fprintf(stderr, "receiver: accept: %s\n", ec.message().c_str());
    });
    int commits = 0;
    int status = 0;
    std::function<void()> next = [&] {
      rx.async_wait_notification([&](std::error_code ec, sl::notice n) {
        if (ec) {
          std::fprintf(stderr, "receiver: sender left: %s\n", ec.message().c_str());
          if (commits < rounds) status = 1;
          return io.stop();
        }
        if (n.kind == sl::notice_kind::commit && ++commits == rounds) {
          std::size_t bad = 0;
          for (std::size_t i = 0; i < tensors.size(); ++i) {
            const std::size_t words = tensors[i].bytes / 4, sample = std::min<std::size_t>(words, 16384);
            for (std::size_t first : {std::size_t(0), (words - sample) / 2, words - sample})
              if (!sample_holds(where[i], first, sample, seed_of(i))) ++bad;
          }
          std::fprintf(stderr, "receiver: %d commits; samples of %zu tensors checked: %s\n", commits, tensors.size(),
                       bad ? "SOME DIFFER" : "all equal");
          if (bad) status = 3;
        }
        next();
      });
    };
    next();
    io.run_for(600s);
    rx.close();
    if (vmm) {
      cuda::detail::context_scope scope(device);
      for (std::size_t c = 0; c < chunks.size(); ++c) (void)d.unmap(range + c * vmm_chunk, vmm_chunk);
      for (auto hnd : chunks) (void)d.release(hnd);
      (void)d.address_free(range, range_bytes);
    }
    return accepted ? status : 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "receiver: %s\n", e.what());
    return 2;
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  double gib = 8;
  int rounds = 5;
  bool json = false, vmm = false;
  std::string receiver_spec;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") json = true;
    else if (a == "--vmm") vmm = true;
    else if (a == "--gib" && i + 1 < argc) gib = std::atof(argv[++i]);
    else if (a == "--rounds" && i + 1 < argc) rounds = std::atoi(argv[++i]);
    else if (a == "--receiver" && i + 1 < argc) receiver_spec = argv[++i];
    else {
      std::fprintf(stderr, "usage: bench_cuda_ipc [--gib G] [--rounds R] [--vmm] [--json]\n");
      return 2;
    }
  }
  if (!receiver_spec.empty()) {  // PATH,DEVICE
    const auto comma = receiver_spec.find(',');
    return run_receiver(receiver_spec.substr(0, comma), gib, vmm, std::atoi(receiver_spec.c_str() + comma + 1), rounds);
  }
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_ipc: skipped: no GPU (%s)\n", cuda::unavailable_reason().c_str());
    return 0;
  }
  const int gpus = cuda::device_count();
  const int target = gpus > 1 ? 1 : 0;
  const auto tensors = model(gib);
  const std::size_t bytes = total_bytes(tensors);

  // The receiver: this executable again (exec, not a fork of a process that used CUDA).
  const std::string path = "/tmp/shardline-bench-ipc-" + std::to_string(::getpid()) + ".sock";
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return 2;
  self[n] = '\0';
  std::vector<std::string> args{self, "--receiver", path + "," + std::to_string(target), "--gib", std::to_string(gib),
                                "--rounds", std::to_string(rounds)};
  if (vmm) args.push_back("--vmm");
  std::vector<char*> argv_child;
  for (auto& a : args) argv_child.push_back(a.data());
  argv_child.push_back(nullptr);
  pid_t child = -1;
  if (posix_spawn(&child, self, nullptr, nullptr, argv_child.data(), environ) != 0) return 2;

  try {
    // The sender's flat parameters on GPU 0, each tensor filled with its own words.
    cuda::device_buffer source(bytes, 0);
    cuda::stream s0(0);
    std::vector<std::size_t> offset;
    std::size_t at = 0;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      offset.push_back(at);
      check(gpu_test::fill_words(reinterpret_cast<std::uint32_t*>(source.data() + at), tensors[i].bytes / 4, seed_of(i),
                                 s0.native_handle()),
            "fill_words");
      at += tensors[i].bytes;
    }
    s0.synchronize();

    asio::io_context io;
    cuda::ipc_transport transport(io.get_executor());
    auto reg = transport.register_memory(source.bytes(), sl::memory_location::cuda(0));
    std::optional<cuda::ipc_transport::connection> conn;
    const auto connecting = clock_type::now();
    for (int attempt = 0; !conn && attempt < 3000; ++attempt) {
      std::optional<std::error_code> got;
      transport.async_connect(path, {0, 0}, [&](std::error_code ec, cuda::ipc_transport::connection c) {
        got = ec;
        if (!ec) conn.emplace(std::move(c));
      });
      while (!got) io.run_one();
      io.restart();
      if (*got && *got != std::errc::no_such_file_or_directory && *got != std::errc::connection_refused) {
        std::fprintf(stderr, "bench_cuda_ipc: connect: %s\n", got->message().c_str());
        ::kill(child, SIGKILL);
        return 1;
      }
      if (!conn) std::this_thread::sleep_for(20ms);
    }
    if (!conn) throw std::runtime_error("the receiver never listened");
    const double connect_ms = std::chrono::duration<double, std::milli>(clock_type::now() - connecting).count();

    // One batch per layer, as a pipeline of one bucket per layer would write.
    std::vector<std::vector<sl::write_request>> batches(tensors.back().layer + 1);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto* r = conn->remote_regions().find(tensors[i].name);
      if (!r) throw std::runtime_error("the receiver lacks " + tensors[i].name);
      batches[tensors[i].layer].push_back(
          sl::make_write(reg.region(), std::span(source.data() + offset[i], tensors[i].bytes), *r));
    }

    // The baseline's destination: the same tensors on the receiver's GPU, in this process.
    std::vector<cuda::device_buffer> peer;
    for (const auto& t : tensors) peer.emplace_back(t.bytes, target);
    cuda::stream copy_stream(0);
    if (target != 0) {
      cuda::detail::device_scope scope(0);
      const cudaError_t e = cudaDeviceEnablePeerAccess(target, 0);
      if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) check(e, "cudaDeviceEnablePeerAccess");
      (void)cudaGetLastError();
    }

    const auto ipc_round = [&](std::uint32_t version) {
      const auto start = clock_type::now();
      std::size_t pending = 0;
      std::error_code failure;
      const auto done = [&](std::error_code ec) {
        if (ec && !failure) failure = ec;
        --pending;
      };
      ++pending;
      conn->async_notify(sl::notice_kind::begin, version, done);
      for (const auto& b : batches) {
        ++pending;
        conn->async_write(b, done);
      }
      ++pending;
      conn->async_notify(sl::notice_kind::commit, version, done);
      while (pending > 0) io.run_one();
      io.restart();
      if (failure) throw sl::error(failure, "ipc update");
      return std::chrono::duration<double>(clock_type::now() - start).count();
    };
    const auto peer_round = [&] {
      const auto start = clock_type::now();
      for (std::size_t i = 0; i < tensors.size(); ++i)
        check(cudaMemcpyPeerAsync(peer[i].data(), target, source.data() + offset[i], 0, tensors[i].bytes,
                                  copy_stream.native_handle()),
              "cudaMemcpyPeerAsync");
      copy_stream.synchronize();
      return std::chrono::duration<double>(clock_type::now() - start).count();
    };

    peer_round();  // warm-up of the copy path; the IPC path was warmed by nothing but connect
    std::vector<double> ipc, base;
    for (int r = 0; r < rounds; ++r) {
      ipc.push_back(ipc_round(static_cast<std::uint32_t>(r + 1)));
      base.push_back(peer_round());
    }
    conn->close();
    int status = 0;
    ::waitpid(child, &status, 0);
    const int receiver_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);

    const double gb = double(bytes) / 1e9;
    const double ours = gb / median(ipc), theirs = gb / median(base);
    FILE* table = json ? stderr : stdout;
    std::fprintf(table, "cuda_ipc: %zu tensors, %.2f GiB bf16, GPU 0 -> GPU %d (%d GPUs), %s handles; connect %.1f ms\n",
                 tensors.size(), double(bytes) / double(std::size_t(1) << 30), target, gpus, vmm ? "VMM" : "legacy",
                 connect_ms);
    std::fprintf(table, "  %-28s %10s %10s\n", "round", "ipc GB/s", "peer GB/s");
    for (int r = 0; r < rounds; ++r) std::fprintf(table, "  %-28d %10.1f %10.1f\n", r + 1, gb / ipc[r], gb / base[r]);
    std::fprintf(table, "  %-28s %10.1f %10.1f   ratio %.3f\n", "median", ours, theirs, ours / theirs);
    std::fprintf(table, "  receiver exit status %d (0: every sampled byte as sent)\n", receiver_status);
    if (json)
      std::printf("{\"name\":\"cuda.ipc_vs_peer\",\"value\":%.1f,\"unit\":\"GB/s\",\"baseline\":%.1f,\"ratio\":%.3f}\n",
                  ours, theirs, ours / theirs);
    return receiver_status == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_ipc: %s\n", e.what());
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    return 1;
  }
}
