// cuda_fanout: one sender GPU updating N receiver processes (one GPU each, N = GPUs - 1 by
// default) over cuda::ipc_transport, against NCCL broadcasts of the same tensors from the
// sender to the same GPUs, in the same run.
//
//   bench_cuda_fanout [--receivers N] [--model llama|moe] [--gib G] [--rounds R] [--json]
//
// Model, receivers and checks as bench_cuda_ipc's (bench/cuda_weight_sync.hpp): a bf16 model
// of G GiB (default 8; Llama-3-8B shapes, or Qwen3-30B-A3B's with --model moe, the JSON rows'
// names then ending in .moe), one cudaMalloc per tensor in each receiver process on GPUs
// 1..N; the sender's flat parameters on GPU 0.
//   ipc fan-out     one connection per receiver (each with its own copy stream on GPU 0); on
//                   every one begin, one write batch per layer, commit, all connections' work
//                   in flight together: host clock from the first initiation to the last
//                   commit's acknowledgement; the JSON value (GB/s = the model's bytes over that
//                   time: every receiver holds the whole model at its end)
//   NCCL            one communicator of N + 1 ranks (the sender rank 0): one ncclBroadcast per
//                   tensor with ncclGroupStart/End around each layer (cuda.fanout's baseline),
//                   ungrouped (each its own launch), and one flat buffer (cuda.fanout_flat's
//                   baseline), each rank timing its part with CUDA events; a round's time is the
//                   longest rank's.
// One warm-up round of each, then R rounds (default 5) alternating; fresh words before each,
// every receiver's samples checked after each. Without two GPUs, or without NCCL, it says
// "skipped: ..." on stderr and exits 0.
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
  int rounds = 5, receivers = 0;
  bool json = false;
  std::string receiver_spec, kind = "llama";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") json = true;
    else if (a == "--gib" && i + 1 < argc) gib = std::atof(argv[++i]);
    else if (a == "--model" && i + 1 < argc && ws::is_model(argv[i + 1])) kind = argv[++i];
    else if (a == "--rounds" && i + 1 < argc) rounds = std::max(1, std::atoi(argv[++i]));
    else if (a == "--receivers" && i + 1 < argc) receivers = std::atoi(argv[++i]);
    else if (a == "--receiver" && i + 1 < argc) receiver_spec = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: bench_cuda_fanout [--receivers N] [--model llama|moe] [--gib G] [--rounds R] [--json]\n");
      return 2;
    }
  }
  if (!receiver_spec.empty()) {  // PATH,DEVICE
    const auto comma = receiver_spec.find(',');
    return ws::run_receiver(receiver_spec.substr(0, comma), gib, false, std::atoi(receiver_spec.c_str() + comma + 1),
                            kind);
  }
  const int gpus = cuda::device_count();
  if (gpus == 0) {
    std::fprintf(stderr, "bench_cuda_fanout: skipped: no GPU (%s)\n", cuda::unavailable_reason().c_str());
    return 0;
  }
  if (gpus < 2) {
    std::fprintf(stderr, "bench_cuda_fanout: skipped: one GPU (a sender GPU and at least one receiver GPU needed)\n");
    return 0;
  }
  if (receivers <= 0 || receivers > gpus - 1) receivers = gpus - 1;
  const auto nccl = nccl_dl::load();  // before any CUDA context and before the receivers start
  if (!nccl.loaded()) {
    std::fprintf(stderr, "bench_cuda_fanout: skipped: NCCL not found (%s)\n", nccl.why.c_str());
    return 0;
  }
  const auto tensors = ws::model(gib, kind);
  const std::string suffix = kind == "llama" ? "" : "." + kind;  // on the JSON rows' names
  const std::size_t bytes = ws::total_bytes(tensors);

  std::vector<ws::receiver_process> rx;
  const auto kill_all = [&] {
    for (auto& x : rx) x.kill();
  };
  try {
    for (int k = 0; k < receivers; ++k)
      rx.push_back(ws::spawn_receiver(
          "/tmp/shardline-bench-fanout-" + std::to_string(::getpid()) + "-" + std::to_string(k) + ".sock", k + 1,
          {"--gib", std::to_string(gib), "--model", kind}));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_fanout: %s\n", e.what());
    kill_all();
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
    std::vector<std::vector<std::vector<sl::write_request>>> batches;
    for (const auto& x : rx) {
      conns.push_back(ws::connect(io, transport, x.path));
      batches.push_back(ws::batches_for(conns.back(), reg, source.data(), tensors));
    }
    ws::nccl_rank rank;
    ws::nccl_join_all(nccl, rank, 0, rx);

    const std::vector<ws::nccl_variant> variants{ws::nccl_variant::per_layer_group, ws::nccl_variant::per_tensor,
                                                 ws::nccl_variant::flat};
    const std::size_t methods = 1 + variants.size();
    std::vector<std::vector<double>> secs(methods);
    std::vector<std::vector<double>> rank_ms(rx.size() + 1);  // per_layer_group, each rank's events
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
        } else {
          const auto v = variants[m - 1];
          const auto ms = ws::nccl_round(rank, rx, v, tensors, source.data());
          s = *std::max_element(ms.begin(), ms.end()) / 1e3;
          if (r > 0 && v == ws::nccl_variant::per_layer_group)
            for (std::size_t k = 0; k < ms.size(); ++k) rank_ms[k].push_back(ms[k]);
          wrong = ws::check_all(rx, v == ws::nccl_variant::flat ? ws::op::check_flat : ws::op::check_tensors, salt);
        }
        if (wrong) std::fprintf(stderr, "bench_cuda_fanout: round %d, method %zu: %zu samples differ\n", r, m, wrong);
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
                 "cuda_fanout: %s model, %zu tensors, %.2f GiB bf16, GPU 0 -> %d receiver processes on GPUs 1..%d "
                 "(%d GPUs); NCCL %d (%s)\n",
                 kind.c_str(), tensors.size(), double(bytes) / double(std::size_t(1) << 30), receivers, receivers, gpus,
                 nccl.version, nccl.path.c_str());
    std::fprintf(table,
                 "  GB/s per round = model bytes / time until every receiver holds them (x %d for the bytes moved)\n",
                 receivers);
    std::fprintf(table, "  %-8s %10s %14s %14s %10s\n", "round", "ipc", "nccl/tensor", "nccl/tensor", "nccl");
    std::fprintf(table, "  %-8s %10s %14s %14s %10s\n", "", "fan-out", "layer groups", "ungrouped", "flat");
    for (int r = 0; r < rounds; ++r)
      std::fprintf(table, "  %-8d %10.1f %14.1f %14.1f %10.1f\n", r + 1, gb / secs[0][r], gb / secs[1][r],
                   gb / secs[2][r], gb / secs[3][r]);
    std::fprintf(table, "  %-8s %10.1f %14.1f %14.1f %10.1f\n", "median", med[0], med[1], med[2], med[3]);
    std::fprintf(table, "  ipc / nccl: per tensor grouped %.3f, ungrouped %.3f, flat %.3f\n", med[0] / med[1],
                 med[0] / med[2], med[0] / med[3]);
    std::fprintf(table, "  nccl layer groups, median ms by rank:");
    for (std::size_t k = 0; k < rank_ms.size(); ++k)
      std::fprintf(table, " %s%.3f", k ? "" : "sender ", ws::median(rank_ms[k]));
    std::fprintf(table,
                 "\n  samples differing: %zu (every method, every round, every receiver); receivers' worst exit "
                 "status %d\n",
                 bad, receiver_status);
    const auto row = [&](const char* name, double ours, double theirs) {
      std::printf("{\"name\":\"%s%s\",\"value\":%.1f,\"unit\":\"GB/s\",\"baseline\":%.1f,\"ratio\":%.3f}\n", name,
                  suffix.c_str(), ours, theirs, ours / theirs);
    };
    if (json) {
      row("cuda.fanout", med[0], med[1]);
      row("cuda.fanout_flat", med[0], med[3]);
    }
    return receiver_status == 0 && bad == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_fanout: %s\n", e.what());
    kill_all();
    return 1;
  }
}
