// cuda_ipc: a full weight update over cuda::ipc_transport, sender and receiver in separate
// processes, against cudaMemcpyPeerAsync and NCCL broadcasts of the same tensors in the same run.
//
//   bench_cuda_ipc [--model llama|moe] [--gib G] [--rounds R] [--vmm] [--json]
//
// The receiver (this executable again, started with posix_spawn before the parent touches
// CUDA; bench/cuda_weight_sync.hpp) holds a bf16 model of G GiB (default 8) on the last GPU:
// Llama-3-8B shapes (embed_tokens and lm_head [128256, 4096]; per layer q, o [4096, 4096], k, v
// [1024, 4096], gate, up [14336, 4096], down [4096, 14336], two norms [4096]), or with
// --model moe Qwen3-30B-A3B shapes (393 tensors a layer, most of them 128 experts' 3 MiB
// projections; the JSON rows' names then end in .moe), one cudaMalloc per tensor as an
// engine's caching allocator gives big tensors segments of their own (with --vmm: every
// tensor in one VMM range of 20 MiB physical chunks created shareable as POSIX descriptors, as
// PyTorch's expandable segments). The sender holds
// the same tensors in one flat buffer on GPU 0 (a trainer's flat parameters) and pushes them:
//   ipc update      begin, then one write batch per layer (every batch in flight together),
//                   then commit: host clock from the first write's initiation to the commit's
//                   acknowledgement by the receiver process; the JSON rows' value
//   cudaMemcpyPeer  cudaMemcpyPeerAsync of the same tensors from the same source into a
//                   buffer on the receiver's GPU allocated in this process, on one stream,
//                   until cudaStreamSynchronize returns; cuda.ipc_vs_peer's baseline
//   NCCL            sender rank 0 and the receiver process rank 1 of one communicator (NCCL
//                   loaded at run time, bench/nccl_dl.hpp), broadcasting from rank 0 into the
//                   receiver's same tensors: one ncclBroadcast per tensor with
//                   ncclGroupStart/End around each layer (cuda.ipc_vs_nccl's baseline); one
//                   ncclBroadcast per tensor, ungrouped, each its own launch, as
//                   torch.distributed.broadcast per parameter does (cuda.ipc_vs_nccl_ungrouped);
//                   one ncclBroadcast of the whole flat buffer into a flat buffer of the
//                   receiver's (cuda.ipc_vs_nccl_flat). Each rank times its part with CUDA
//                   events; a round's time is the longer of the two.
// One warm-up round of each, then R rounds (default 5), each running every method in turn;
// before each method's round the sender refills its tensors with fresh words, and after it
// the receiver checks the first, a middle and the last 64 KiB of every tensor (the peer
// baseline's destination is checked by the sender). The table shows each round's GB/s, the
// JSON the medians'. With one GPU both sides use it (the peer baseline is then a device-local
// cudaMemcpyAsync) and NCCL is skipped; without NCCL its rows say "skipped" on stderr; with
// no usable GPU it says so on stderr and exits 0.
#include "cuda_weight_sync.hpp"

#include <shardline/cuda/device.hpp>

#include <asio/io_context.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace ws = weight_sync;
namespace sl = shardline;
namespace cuda = shardline::cuda;

int main(int argc, char** argv) {
  double gib = 8;
  int rounds = 5;
  bool json = false, vmm = false;
  std::string receiver_spec, kind = "llama";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") json = true;
    else if (a == "--vmm") vmm = true;
    else if (a == "--gib" && i + 1 < argc) gib = std::atof(argv[++i]);
    else if (a == "--model" && i + 1 < argc && ws::is_model(argv[i + 1])) kind = argv[++i];
    else if (a == "--rounds" && i + 1 < argc) rounds = std::max(1, std::atoi(argv[++i]));
    else if (a == "--receiver" && i + 1 < argc) receiver_spec = argv[++i];
    else {
      std::fprintf(stderr, "usage: bench_cuda_ipc [--model llama|moe] [--gib G] [--rounds R] [--vmm] [--json]\n");
      return 2;
    }
  }
  if (!receiver_spec.empty()) {  // PATH,DEVICE
    const auto comma = receiver_spec.find(',');
    return ws::run_receiver(receiver_spec.substr(0, comma), gib, vmm, std::atoi(receiver_spec.c_str() + comma + 1),
                            kind);
  }
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_ipc: skipped: no GPU (%s)\n", cuda::unavailable_reason().c_str());
    return 0;
  }
  const int gpus = cuda::device_count();
  const int target = gpus > 1 ? 1 : 0;
  const auto tensors = ws::model(gib, kind);
  const std::string suffix = kind == "llama" ? "" : "." + kind;  // on the JSON rows' names
  const std::size_t bytes = ws::total_bytes(tensors);
  const auto offset = ws::offsets(tensors);

  // NCCL before any CUDA context and before the receiver starts (it inherits the library's path).
  std::optional<nccl_dl::api> nccl;
  std::string no_nccl;
  if (gpus < 2) {
    no_nccl = "NCCL needs a GPU per rank, this machine has one";
  } else {
    nccl.emplace(nccl_dl::load());
    if (!nccl->loaded()) no_nccl = "NCCL not found (" + nccl->why + ")";
  }
  if (!no_nccl.empty()) {
    std::fprintf(stderr, "bench_cuda_ipc: cuda.ipc_vs_nccl skipped: %s\n", no_nccl.c_str());
    nccl.reset();
  }

  std::vector<ws::receiver_process> rx;
  const std::string path = "/tmp/shardline-bench-ipc-" + std::to_string(::getpid()) + ".sock";
  std::vector<std::string> extra{"--gib", std::to_string(gib), "--model", kind};
  if (vmm) extra.push_back("--vmm");
  try {
    rx.push_back(ws::spawn_receiver(path, target, extra));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_ipc: %s\n", e.what());
    return 2;
  }

  try {
    cuda::device_buffer source(bytes, 0);
    cuda::stream s0(0);
    ws::fill(source.data(), tensors, 1, s0);

    asio::io_context io;
    cuda::ipc_transport transport(io.get_executor());
    auto reg = transport.register_memory(source.bytes(), sl::memory_location::cuda(0));
    std::vector<cuda::ipc_transport::connection> conns;
    const auto connecting = ws::clock_type::now();
    conns.push_back(ws::connect(io, transport, path));
    const double connect_ms = std::chrono::duration<double, std::milli>(ws::clock_type::now() - connecting).count();
    std::vector<std::vector<std::vector<sl::write_request>>> batches;
    batches.push_back(ws::batches_for(conns[0], reg, source.data(), tensors));

    ws::nccl_rank rank;
    double join_ms = 0;
    if (nccl) {
      const auto joining = ws::clock_type::now();
      ws::nccl_join_all(*nccl, rank, 0, rx);
      join_ms = std::chrono::duration<double, std::milli>(ws::clock_type::now() - joining).count();
    }

    // The peer baseline's destination: the same tensors on the receiver's GPU, in this process.
    std::vector<cuda::device_buffer> peer;
    std::vector<const std::byte*> peer_where;
    for (const auto& t : tensors) {
      peer.emplace_back(t.bytes, target);
      peer_where.push_back(peer.back().data());
    }
    cuda::stream copy_stream(0);
    if (target != 0) {
      cuda::detail::device_scope scope(0);
      const cudaError_t e = cudaDeviceEnablePeerAccess(target, 0);
      if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) ws::check(e, "cudaDeviceEnablePeerAccess");
      (void)cudaGetLastError();
    }
    const auto peer_round = [&] {
      const auto start = ws::clock_type::now();
      for (std::size_t i = 0; i < tensors.size(); ++i)
        ws::check(cudaMemcpyPeerAsync(peer[i].data(), target, source.data() + offset[i], 0, tensors[i].bytes,
                                      copy_stream.native_handle()),
                  "cudaMemcpyPeerAsync");
      copy_stream.synchronize();
      return std::chrono::duration<double>(ws::clock_type::now() - start).count();
    };

    // Methods: 0 ipc, 1 peer, 2.. the NCCL variants. Seconds per method per timed round.
    const std::vector<ws::nccl_variant> variants{ws::nccl_variant::per_layer_group, ws::nccl_variant::per_tensor,
                                                 ws::nccl_variant::flat};
    const std::size_t methods = 2 + (nccl ? variants.size() : 0);
    std::vector<std::vector<double>> secs(methods);
    std::vector<double> nccl_sender_ms, nccl_receiver_ms;  // per_layer_group, each rank's events
    std::size_t bad = 0;
    for (int r = 0; r <= rounds; ++r) {  // round 0 warms up
      for (std::size_t m = 0; m < methods; ++m) {
        const auto salt = static_cast<std::uint32_t>(r * 8 + m + 2);
        ws::fill(source.data(), tensors, salt, s0);
        double s = 0;
        std::size_t wrong = 0;
        if (m == 0) {
          s = ws::ipc_update(io, conns, batches, salt);
          wrong = ws::check_all(rx, ws::op::check_tensors, salt);
        } else if (m == 1) {
          s = peer_round();
          wrong = ws::count_bad(tensors, peer_where, salt);
        } else {
          const auto v = variants[m - 2];
          const auto ms = ws::nccl_round(rank, rx, v, tensors, source.data());
          s = *std::max_element(ms.begin(), ms.end()) / 1e3;
          if (r > 0 && v == ws::nccl_variant::per_layer_group) {
            nccl_sender_ms.push_back(ms[0]);
            nccl_receiver_ms.push_back(ms[1]);
          }
          wrong = ws::check_all(rx, v == ws::nccl_variant::flat ? ws::op::check_flat : ws::op::check_tensors, salt);
        }
        if (wrong) std::fprintf(stderr, "bench_cuda_ipc: round %d, method %zu: %zu samples differ\n", r, m, wrong);
        bad += wrong;
        if (r > 0) secs[m].push_back(s);
      }
    }
    for (auto& c : conns) c.close();
    const int receiver_status = ws::quit_all(rank, rx);

    const double gb = double(bytes) / 1e9;
    std::vector<double> med;
    for (const auto& v : secs) med.push_back(gb / ws::median(v));
    FILE* table = json ? stderr : stdout;
    std::fprintf(table,
                 "cuda_ipc: %s model, %zu tensors in %zu layers' batches, %.2f GiB bf16, GPU 0 -> GPU %d (%d GPUs), "
                 "%s handles; connect %.1f ms%s\n",
                 kind.c_str(), tensors.size(), batches[0].size(), double(bytes) / double(std::size_t(1) << 30), target,
                 gpus, vmm ? "VMM" : "legacy", connect_ms,
                 nccl ? (", NCCL " + std::to_string(nccl->version) + " (" + nccl->path + ") joined in " +
                         std::to_string(static_cast<int>(join_ms)) + " ms")
                            .c_str()
                      : "");
    std::fprintf(table, "  GB/s per round%s\n", nccl ? "; NCCL: the longer of the two ranks' CUDA-event times" : "");
    std::fprintf(table, "  %-8s %10s %10s", "round", "ipc", "peer");
    if (nccl) std::fprintf(table, " %14s %14s %10s", "nccl/tensor", "nccl/tensor", "nccl");
    std::fprintf(table, "\n  %-8s %10s %10s", "", "", "");
    if (nccl) std::fprintf(table, " %14s %14s %10s", "layer groups", "ungrouped", "flat");
    std::fprintf(table, "\n");
    for (int r = 0; r < rounds; ++r) {
      std::fprintf(table, "  %-8d %10.1f %10.1f", r + 1, gb / secs[0][r], gb / secs[1][r]);
      if (nccl) std::fprintf(table, " %14.1f %14.1f %10.1f", gb / secs[2][r], gb / secs[3][r], gb / secs[4][r]);
      std::fprintf(table, "\n");
    }
    std::fprintf(table, "  %-8s %10.1f %10.1f", "median", med[0], med[1]);
    if (nccl) std::fprintf(table, " %14.1f %14.1f %10.1f", med[2], med[3], med[4]);
    std::fprintf(table, "\n  ipc / peer %.3f", med[0] / med[1]);
    if (nccl)
      std::fprintf(table, "; ipc / nccl: per tensor grouped %.3f, ungrouped %.3f, flat %.3f", med[0] / med[2],
                   med[0] / med[3], med[0] / med[4]);
    std::fprintf(table, "\n");
    if (nccl)
      std::fprintf(table, "  nccl layer groups, median ms by rank: sender %.3f, receiver %.3f\n",
                   ws::median(nccl_sender_ms), ws::median(nccl_receiver_ms));
    std::fprintf(table, "  samples differing: %zu (every method, every round); receiver exit status %d\n", bad,
                 receiver_status);
    const auto row = [&](const char* name, double ours, double theirs) {
      std::printf("{\"name\":\"%s%s\",\"value\":%.1f,\"unit\":\"GB/s\",\"baseline\":%.1f,\"ratio\":%.3f}\n", name,
                  suffix.c_str(), ours, theirs, ours / theirs);
    };
    if (json) {
      row("cuda.ipc_vs_peer", med[0], med[1]);
      if (nccl) {
        row("cuda.ipc_vs_nccl", med[0], med[2]);
        row("cuda.ipc_vs_nccl_ungrouped", med[0], med[3]);
        row("cuda.ipc_vs_nccl_flat", med[0], med[4]);
      }
    }
    return receiver_status == 0 && bad == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_ipc: %s\n", e.what());
    for (auto& x : rx) x.kill();
    return 1;
  }
}
