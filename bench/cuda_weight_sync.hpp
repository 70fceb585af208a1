// bench/cuda_weight_sync.hpp: what bench/cuda_ipc.cpp and bench/cuda_fanout.cpp share. A
// Llama-style bf16 model; receiver processes (the benchmark's executable again, started with
// posix_spawn before the sender touches CUDA, one GPU each) that expose the model's tensors
// over cuda::ipc_transport and take commands from the sender over a pair of pipes: join an
// NCCL communicator, run a broadcast variant and time it with CUDA events, check samples of
// what landed; and the sender's halves of both (an IPC update to every receiver at once, an
// NCCL round on every rank).
//
// Every round writes fresh words: the sender fills tensor i with fill_words(seed_of(i, salt))
// before each round (a salt of its own per round and method, outside the timing), and the
// receivers then check the first, a middle and the last 64 KiB of every tensor against it, so
// a round that left stale bytes anywhere sampled fails the run.
#pragma once

#include "nccl_dl.hpp"

#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/ipc_transport.hpp>
#include <shardline/cuda/stream.hpp>

#include <asio/io_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/read.hpp>

#include <gpu_kernels.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace weight_sync {

namespace sl = shardline;
namespace cuda = shardline::cuda;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct tensor {
  std::string name;
  std::size_t bytes;
  std::size_t layer;  // the write batch (and NCCL group) it travels in: embed 0, layers 1..L, lm_head L + 1
};

// The models, as many layers as reach `gib` GiB of bf16, each layer one write batch:
//   llama  Llama-3-8B shapes: embed_tokens and lm_head [128256, 4096]; per layer q, o
//          [4096, 4096], k, v [1024, 4096], gate, up [14336, 4096], down [4096, 14336], two
//          norms [4096] (9 tensors, 436 MiB)
//   moe    Qwen3-30B-A3B shapes: embed_tokens and lm_head [151936, 2048]; per layer q [4096,
//          2048], k, v [512, 2048], o [2048, 4096], q_norm, k_norm [128], two norms [2048], the
//          router [128, 2048] and 128 experts' gate, up [768, 2048] and down [2048, 768] (393
//          tensors, 1.13 GiB; most of them 3 MiB)
inline bool is_model(const std::string& kind) { return kind == "llama" || kind == "moe"; }

inline std::vector<tensor> model(double gib, const std::string& kind = "llama") {
  const bool moe = kind == "moe";
  const std::size_t bf16 = 2, h = moe ? 2048 : 4096, vocab = moe ? 151936 : 128256;
  std::vector<std::pair<std::string, std::size_t>> layer;  // name, elements
  if (moe) {
    layer = {{"input_layernorm.weight", h},           {"self_attn.q_proj.weight", 4096 * h},
             {"self_attn.k_proj.weight", 512 * h},    {"self_attn.v_proj.weight", 512 * h},
             {"self_attn.o_proj.weight", h * 4096},   {"self_attn.q_norm.weight", 128},
             {"self_attn.k_norm.weight", 128},        {"post_attention_layernorm.weight", h},
             {"mlp.gate.weight", 128 * h}};
    for (int e = 0; e < 128; ++e) {
      const std::string x = "mlp.experts." + std::to_string(e) + ".";
      layer.push_back({x + "gate_proj.weight", 768 * h});
      layer.push_back({x + "up_proj.weight", 768 * h});
      layer.push_back({x + "down_proj.weight", h * 768});
    }
  } else {
    const std::size_t kv = 1024, ffn = 14336;
    layer = {{"input_layernorm.weight", h},         {"self_attn.q_proj.weight", h * h},
             {"self_attn.k_proj.weight", kv * h},   {"self_attn.v_proj.weight", kv * h},
             {"self_attn.o_proj.weight", h * h},    {"post_attention_layernorm.weight", h},
             {"mlp.gate_proj.weight", ffn * h},     {"mlp.up_proj.weight", ffn * h},
             {"mlp.down_proj.weight", h * ffn}};
  }
  std::vector<tensor> t{{"model.embed_tokens.weight", vocab * h * bf16, 0}};
  std::size_t total = 2 * vocab * h * bf16;
  const auto target = static_cast<std::size_t>(gib * double(std::size_t(1) << 30));
  for (std::size_t l = 0; total < target; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const auto& [n, elements] : layer) {
      t.push_back({p + n, elements * bf16, l + 1});
      total += elements * bf16;
    }
  }
  t.push_back({"lm_head.weight", vocab * h * bf16, t.back().layer + 1});
  return t;
}

inline std::size_t total_bytes(const std::vector<tensor>& t) {
  std::size_t n = 0;
  for (const auto& x : t) n += x.bytes;
  return n;
}

// Where each tensor starts in a flat buffer of them all (the sender's parameters, a flat
// broadcast's destination).
inline std::vector<std::size_t> offsets(const std::vector<tensor>& t) {
  std::vector<std::size_t> o;
  std::size_t at = 0;
  for (const auto& x : t) {
    o.push_back(at);
    at += x.bytes;
  }
  return o;
}

inline void check(cudaError_t e, const std::string& what) { cuda::throw_if(e, what); }

inline std::uint32_t seed_of(std::size_t i, std::uint32_t salt) {
  return static_cast<std::uint32_t>(i * 7919 + 1) ^ (salt * 0x9E3779B9u);
}

// Whether `words` words at device pointer `p` hold fill_words(seed) from word `first` on.
inline bool sample_holds(const std::byte* p, std::size_t first_word, std::size_t words, std::uint32_t seed) {
  std::vector<std::uint32_t> got(words);
  check(cudaMemcpy(got.data(), p + first_word * 4, words * 4, cudaMemcpyDeviceToHost), "cudaMemcpy of a sample");
  for (std::size_t i = 0; i < words; ++i)
    if (got[i] != gpu_test::word(first_word + i, seed)) return false;
  return true;
}

// How many of the 3 samples of every tensor (tensor i at where[i]) differ from salt's words.
inline std::size_t count_bad(const std::vector<tensor>& t, const std::vector<const std::byte*>& where,
                             std::uint32_t salt) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < t.size(); ++i) {
    const std::size_t words = t[i].bytes / 4, sample = std::min<std::size_t>(words, 16384);
    for (std::size_t first : {std::size_t(0), (words - sample) / 2, words - sample})
      if (!sample_holds(where[i], first, sample, seed_of(i, salt))) ++bad;
  }
  return bad;
}

// Fills the sender's flat parameters with salt's words and waits for it.
inline void fill(std::byte* flat, const std::vector<tensor>& t, std::uint32_t salt, const cuda::stream& s) {
  const auto off = offsets(t);
  for (std::size_t i = 0; i < t.size(); ++i)
    check(gpu_test::fill_words(reinterpret_cast<std::uint32_t*>(flat + off[i]), t[i].bytes / 4, seed_of(i, salt),
                               s.native_handle()),
          "fill_words");
  s.synchronize();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// ---- NCCL rounds, the same code on every rank -----------------------------------------------

enum class nccl_variant : std::uint32_t {
  per_layer_group,  // one ncclBroadcast per tensor, ncclGroupStart/End around each layer's
  per_tensor,       // one ncclBroadcast per tensor, no group: each its own launch
  flat,             // one ncclBroadcast of every tensor's bytes in one buffer
};

inline const char* name_of(nccl_variant v) {
  switch (v) {
    case nccl_variant::per_layer_group: return "nccl per tensor, grouped by layer";
    case nccl_variant::per_tensor: return "nccl per tensor, ungrouped";
    case nccl_variant::flat: return "nccl one flat buffer";
  }
  return "?";
}

struct nccl_rank {
  const nccl_dl::api* nccl = nullptr;
  nccl_dl::comm_t comm = nullptr;
  int device = 0;
  std::optional<cuda::stream> s;
  std::optional<cuda::event> start, stop;

  void join(const nccl_dl::api& api, const nccl_dl::unique_id& id, int ranks, int rank, int dev) {
    nccl = &api;
    device = dev;
    check(cudaSetDevice(device), "cudaSetDevice");
    s.emplace(device);
    start.emplace(device, cudaEventDefault);
    stop.emplace(device, cudaEventDefault);
    api.check(api.comm_init_rank(&comm, ranks, id, rank), "ncclCommInitRank");
  }

  // Enqueues one broadcast of the variant from rank 0 between two events and waits for it: the
  // milliseconds between the events on this rank. Rank 0 broadcasts in place (send = receive
  // buffer), as torch.distributed.broadcast does.
  double run(nccl_variant v, const std::vector<tensor>& t, const std::vector<std::byte*>& where, std::byte* flat) {
    const auto& n = *nccl;
    start->record(*s);
    const auto bcast = [&](std::byte* p, std::size_t bytes) {
      n.check(n.broadcast(p, p, bytes / 2, nccl_dl::bfloat16, 0, comm, s->native_handle()), "ncclBroadcast");
    };
    if (v == nccl_variant::flat) {
      bcast(flat, total_bytes(t));
    } else {
      for (std::size_t i = 0; i < t.size(); ++i) {
        const bool opens = v == nccl_variant::per_layer_group && (i == 0 || t[i - 1].layer != t[i].layer);
        const bool closes = v == nccl_variant::per_layer_group && (i + 1 == t.size() || t[i + 1].layer != t[i].layer);
        if (opens) n.check(n.group_start(), "ncclGroupStart");
        bcast(where[i], t[i].bytes);
        if (closes) n.check(n.group_end(), "ncclGroupEnd");
      }
    }
    stop->record(*s);
    stop->synchronize();
    return elapsed_ms(*start, *stop);
  }

  // ncclCommDestroy: done on every rank at about the same time (quit_all), as it may wait
  // for the others.
  void leave() noexcept {
    if (comm) (void)nccl->comm_destroy(comm);
    comm = nullptr;
  }
  ~nccl_rank() { leave(); }
};

// ---- the sender <-> receiver command pipe -------------------------------------------------------

enum class op : std::uint32_t { nccl_join = 1, nccl_run, check_tensors, check_flat, quit };

struct command {
  op what{};
  std::uint32_t variant = 0;  // nccl_variant for nccl_run
  std::uint32_t salt = 0;     // for check_*
  std::int32_t ranks = 0, rank = 0;
  nccl_dl::unique_id id{};
};

struct reply {
  std::int32_t status = 0;  // 0 fine; else failed (what says why) or samples differed (bad)
  std::uint32_t bad = 0;
  double ms = 0;
  char what[232]{};
};

inline void write_all(int fd, const void* p, std::size_t n) {
  const auto* b = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t k = ::write(fd, b, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) throw std::runtime_error(std::string("pipe write: ") + std::strerror(errno));
    b += k;
    n -= static_cast<std::size_t>(k);
  }
}

inline void read_all(int fd, void* p, std::size_t n) {
  auto* b = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t k = ::read(fd, b, n);
    if (k < 0 && errno == EINTR) continue;
    if (k == 0) throw std::runtime_error("pipe read: the receiver process is gone");
    if (k < 0) throw std::runtime_error(std::string("pipe read: ") + std::strerror(errno));
    b += k;
    n -= static_cast<std::size_t>(k);
  }
}

// ---- the receiver process ----------------------------------------------------------------------

// PyTorch's expandable segments grow the large pool by 20 MiB chunks.
constexpr std::size_t vmm_chunk = std::size_t(20) << 20;

// The pipe ends a receiver process reads commands from and writes replies to.
constexpr int receiver_command_fd = 100, receiver_reply_fd = 101;

/// A receiver process's main: listens at `path` on `device` with model(gib, kind) (one
/// cudaMalloc per tensor, or with `vmm` one VMM range of 20 MiB shareable chunks) until the
/// sender says quit or its pipe closes. 0: every check passed; 2: set-up failed.
inline int run_receiver(const std::string& path, double gib, bool vmm, int device, const std::string& kind) {
  try {
    ::setenv("NCCL_NVLS_ENABLE", "0", 1);
    // Its GPU current for the whole process: the checks read VMM memory that only this device
    // was given access to.
    check(cudaSetDevice(device), "cudaSetDevice");
    const auto tensors = model(gib, kind);
    asio::io_context io;
    cuda::ipc_options o;
    o.device = device;
    cuda::ipc_transport::receiver rx(io.get_executor(), path, o);
    std::vector<cuda::device_buffer> buffers;
    std::vector<std::byte*> where;
    CUdeviceptr range = 0;
    std::size_t range_bytes = 0;
    std::vector<CUmemGenericAllocationHandle> chunks;
    const auto& d = cuda::detail::driver();
    if (vmm) {
      std::size_t total = 0;
      for (const auto& t : tensors) total += (t.bytes + 255) / 256 * 256;
      range_bytes = (total + vmm_chunk - 1) / vmm_chunk * vmm_chunk;
      CUmemAllocationProp prop{};
      prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
      prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      prop.location.id = device;
      prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
      cuda::detail::context_scope scope(device);
      if (!d.available || d.address_reserve(&range, range_bytes, 0, 0, 0) != CUDA_SUCCESS)
        throw std::runtime_error("cuMemAddressReserve failed");
      for (std::size_t at = 0; at < range_bytes; at += vmm_chunk) {
        CUmemGenericAllocationHandle hnd = 0;
        if (d.create(&hnd, vmm_chunk, &prop, 0) != CUDA_SUCCESS ||
            d.map(range + at, vmm_chunk, 0, hnd, 0) != CUDA_SUCCESS)
          throw std::runtime_error("cuMemCreate/cuMemMap failed");
        chunks.push_back(hnd);
      }
      CUmemAccessDesc access{};
      access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      access.location.id = device;
      access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      if (d.set_access(range, range_bytes, &access, 1) != CUDA_SUCCESS)
        throw std::runtime_error("cuMemSetAccess failed");
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
      rx.expose(
          {tensors[i].name, std::span(where[i], tensors[i].bytes), sl::memory_location::cuda(device), std::nullopt});
    const double expose_ms = std::chrono::duration<double, std::milli>(clock_type::now() - exposing).count();
    std::fprintf(stderr, "receiver on GPU %d: %zu tensors, %zu allocations exported (%zu VMM) in %.1f ms\n", device,
                 tensors.size(), rx.exported_allocations(), rx.exported_vmm_allocations(), expose_ms);
    bool accepted = false;
    rx.async_accept([&](std::error_code ec, std::uint32_t) {
      accepted = !ec;
      if (ec) std::fprintf(stderr, "receiver: accept: %s\n", ec.message().c_str());
    });
    // Notices are drained (their acknowledgements go out as they arrive); the checks come as
    // commands.
    std::function<void()> next_notice = [&] {
      rx.async_wait_notification([&](std::error_code ec, sl::notice) {
        if (!ec) next_notice();
      });
    };
    next_notice();

    std::optional<nccl_dl::api> nccl;
    nccl_rank rank;
    std::optional<cuda::device_buffer> flat;  // a flat broadcast's destination, at the first
    const std::vector<const std::byte*> cwhere(where.begin(), where.end());
    int status = 0;
    asio::posix::stream_descriptor commands(io, ::dup(receiver_command_fd));
    command c{};
    std::function<void()> next_command = [&] {
      asio::async_read(commands, asio::buffer(&c, sizeof c), [&](std::error_code ec, std::size_t) {
        if (ec) {  // the sender is gone
          status = status ? status : 2;
          return io.stop();
        }
        reply r;
        try {
          switch (c.what) {
            case op::nccl_join:
              nccl.emplace(nccl_dl::load());
              if (!nccl->loaded()) throw std::runtime_error("NCCL not found (" + nccl->why + ")");
              rank.join(*nccl, c.id, c.ranks, c.rank, device);
              break;
            case op::nccl_run: {
              const auto v = static_cast<nccl_variant>(c.variant);
              if (v == nccl_variant::flat && !flat) flat.emplace(total_bytes(tensors), device);
              r.ms = rank.run(v, tensors, where, flat ? flat->data() : nullptr);
              break;
            }
            case op::check_tensors: r.bad = static_cast<std::uint32_t>(count_bad(tensors, cwhere, c.salt)); break;
            case op::check_flat: {
              if (!flat) throw std::runtime_error("no flat buffer yet");
              const auto off = offsets(tensors);
              std::vector<const std::byte*> in_flat;
              for (auto x : off) in_flat.push_back(flat->data() + x);
              r.bad = static_cast<std::uint32_t>(count_bad(tensors, in_flat, c.salt));
              break;
            }
            case op::quit: rank.leave(); break;
          }
        } catch (const std::exception& e) {
          r.status = 1;
          std::snprintf(r.what, sizeof r.what, "%s", e.what());
        }
        if (r.bad) status = 3;
        try {
          write_all(receiver_reply_fd, &r, sizeof r);
        } catch (const std::exception&) {
          return io.stop();
        }
        if (c.what == op::quit) return io.stop();
        next_command();
      });
    };
    next_command();
    io.run();
    rx.close();
    if (vmm) {
      cuda::detail::context_scope scope(device);
      for (std::size_t k = 0; k < chunks.size(); ++k) (void)d.unmap(range + k * vmm_chunk, vmm_chunk);
      for (auto hnd : chunks) (void)d.release(hnd);
      (void)d.address_free(range, range_bytes);
    }
    return accepted ? status : 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "receiver: %s\n", e.what());
    return 2;
  }
}

// ---- the sender's side ------------------------------------------------------------------------

/// A receiver process as the sender sees it: its pid, socket path, GPU and command pipe.
struct receiver_process {
  pid_t pid = -1;
  std::string path;
  int device = 0;
  int commands = -1, replies = -1;

  void send(const command& c) const { write_all(commands, &c, sizeof c); }
  reply receive() const {
    reply r;
    read_all(replies, &r, sizeof r);
    if (r.status) throw std::runtime_error("receiver on GPU " + std::to_string(device) + ": " + r.what);
    return r;
  }
  reply call(const command& c) const {
    send(c);
    return receive();
  }
  // Waits for it to exit: its exit status (128 + signal when killed).
  int wait() {
    if (pid < 0) return 0;
    if (commands >= 0) ::close(commands);
    if (replies >= 0) ::close(replies);
    commands = replies = -1;
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  void kill() {
    if (pid > 0) ::kill(pid, SIGKILL);
    (void)wait();
  }
};

/// Starts this executable again as `self --receiver PATH,DEVICE extra...`, its command pipe on
/// receiver_command_fd and its replies on receiver_reply_fd.
inline receiver_process spawn_receiver(const std::string& path, int device, const std::vector<std::string>& extra) {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) throw std::runtime_error("readlink /proc/self/exe failed");
  self[n] = '\0';
  std::vector<std::string> args{self, "--receiver", path + "," + std::to_string(device)};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int to_child[2], from_child[2];
  if (::pipe2(to_child, O_CLOEXEC) != 0 || ::pipe2(from_child, O_CLOEXEC) != 0)
    throw std::runtime_error("pipe2 failed");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  // dup2 onto other numbers clears close-on-exec on the child's copies only.
  posix_spawn_file_actions_adddup2(&fa, to_child[0], receiver_command_fd);
  posix_spawn_file_actions_adddup2(&fa, from_child[1], receiver_reply_fd);
  receiver_process r;
  const int e = posix_spawn(&r.pid, self, &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(to_child[0]);
  ::close(from_child[1]);
  if (e != 0) {
    ::close(to_child[1]);
    ::close(from_child[0]);
    throw std::runtime_error(std::string("posix_spawn: ") + std::strerror(e));
  }
  r.path = path;
  r.device = device;
  r.commands = to_child[1];
  r.replies = from_child[0];
  return r;
}

/// Connects `transport` to the receiver at `path`, retrying while it does not listen yet.
inline cuda::ipc_transport::connection connect(asio::io_context& io, cuda::ipc_transport& transport,
                                               const std::string& path) {
  for (int attempt = 0; attempt < 3000; ++attempt) {
    std::optional<std::error_code> got;
    std::optional<cuda::ipc_transport::connection> conn;
    transport.async_connect(path, {0, 0}, [&](std::error_code ec, cuda::ipc_transport::connection c) {
      got = ec;
      if (!ec) conn.emplace(std::move(c));
    });
    while (!got) io.run_one();
    io.restart();
    if (conn) return std::move(*conn);
    if (*got != std::errc::no_such_file_or_directory && *got != std::errc::connection_refused)
      throw sl::error(*got, "connect to " + path);
    std::this_thread::sleep_for(20ms);
  }
  throw std::runtime_error("the receiver at " + path + " never listened");
}

/// One write batch per layer for `conn`, from the sender's flat parameters at `source`.
inline std::vector<std::vector<sl::write_request>> batches_for(const cuda::ipc_transport::connection& conn,
                                                                const cuda::ipc_transport::registration& reg,
                                                                std::byte* source, const std::vector<tensor>& t) {
  const auto off = offsets(t);
  std::vector<std::vector<sl::write_request>> batches(t.back().layer + 1);
  for (std::size_t i = 0; i < t.size(); ++i) {
    const auto* r = conn.remote_regions().find(t[i].name);
    if (!r) throw std::runtime_error("the receiver lacks " + t[i].name);
    batches[t[i].layer].push_back(sl::make_write(reg.region(), std::span(source + off[i], t[i].bytes), *r));
  }
  return batches;
}

/// One IPC update to every connection at once: on each, begin, then one write batch per layer
/// (every batch in flight together), then commit. Seconds from the first write's initiation
/// to the last commit's acknowledgement by its receiver.
inline double ipc_update(asio::io_context& io, std::vector<cuda::ipc_transport::connection>& conns,
                         const std::vector<std::vector<std::vector<sl::write_request>>>& batches,
                         std::uint32_t version) {
  const auto start = clock_type::now();
  std::size_t pending = 0;
  std::error_code failure;
  const auto done = [&](std::error_code ec) {
    if (ec && !failure) failure = ec;
    --pending;
  };
  for (std::size_t k = 0; k < conns.size(); ++k) {
    ++pending;
    conns[k].async_notify(sl::notice_kind::begin, version, done);
    for (const auto& b : batches[k]) {
      ++pending;
      conns[k].async_write(b, done);
    }
    ++pending;
    conns[k].async_notify(sl::notice_kind::commit, version, done);
  }
  while (pending > 0) io.run_one();
  io.restart();
  if (failure) throw sl::error(failure, "ipc update");
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

/// Sender and receivers join one NCCL communicator: the sender rank 0 on `device`, receiver k
/// rank k + 1 on its GPU.
inline void nccl_join_all(const nccl_dl::api& api, nccl_rank& self, int device, std::vector<receiver_process>& rx) {
  command c;
  c.what = op::nccl_join;
  api.check(api.get_unique_id(&c.id), "ncclGetUniqueId");
  c.ranks = static_cast<int>(rx.size()) + 1;
  for (std::size_t k = 0; k < rx.size(); ++k) {
    c.rank = static_cast<int>(k) + 1;
    rx[k].send(c);
  }
  self.join(api, c.id, c.ranks, 0, device);
  for (auto& r : rx) (void)r.receive();
}

/// One NCCL broadcast round on every rank at once. Milliseconds by CUDA events on each rank:
/// [0] the sender's, then each receiver's.
inline std::vector<double> nccl_round(nccl_rank& self, std::vector<receiver_process>& rx, nccl_variant v,
                                      const std::vector<tensor>& t, std::byte* source) {
  command c;
  c.what = op::nccl_run;
  c.variant = static_cast<std::uint32_t>(v);
  for (auto& r : rx) r.send(c);
  const auto off = offsets(t);
  std::vector<std::byte*> where;
  for (auto x : off) where.push_back(source + x);
  std::vector<double> ms{self.run(v, t, where, source)};
  for (auto& r : rx) ms.push_back(r.receive().ms);
  return ms;
}

/// Samples checked on every receiver (its tensors, or its flat buffer): how many differ.
inline std::size_t check_all(std::vector<receiver_process>& rx, op what, std::uint32_t salt) {
  command c;
  c.what = what;
  c.salt = salt;
  for (auto& r : rx) r.send(c);
  std::size_t bad = 0;
  for (auto& r : rx) bad += r.receive().bad;
  return bad;
}

/// Ends the run: every rank leaves the NCCL communicator together, then each receiver exits.
/// The receivers' worst exit status.
inline int quit_all(nccl_rank& self, std::vector<receiver_process>& rx) {
  command c;
  c.what = op::quit;
  for (auto& r : rx) r.send(c);
  self.leave();
  for (auto& r : rx) (void)r.receive();
  int worst = 0;
  for (auto& r : rx) worst = std::max(worst, r.wait());
  return worst;
}

}  // namespace weight_sync
