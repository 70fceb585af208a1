// shardline demo: a trainer process pushes weight versions of a synthetic Qwen-style model
// into rollout processes (one per receiver), over shm by default or verbs, or with
// --device cuda from GPU to GPU over CUDA IPC.
//
//   shardline_demo [--device host|cuda] [--transport shm|verbs|ipc] [--model-bytes 1G]
//                  [--experts N] [--tp N] [--replicas N] [--senders N] [--bucket-bytes 64M]
//                  [--depth 2] [--versions 2] [--trace FILE] [--address 127.0.0.2]
//
// Every sender (trainer rank) and every receiver (rollout rank) is a process of its own.
// With --senders N the trainer's tensors are spread over N ranks, q, k and v of each layer
// on different ranks, and each rank writes its shards straight into the receivers' fused
// parameters. Each rollout process verifies every parameter of every version by checksum
// against the values it computes itself, and tells the parent over a pipe; the exit status
// is 0 only when every receiver verified every version.
//
// --device cuda (transport ipc, CUDA IPC between the processes of this host): each rollout
// process holds its engine's tensors in one allocation of its GPU, adopted by its
// weights_receiver; each trainer rank holds its shards on its GPU and loads them into device
// staging with cudaMemcpyAsync, awaited with cuda::async_wait; receivers copy each parameter
// back to the host to verify it. Process i (receivers first, then senders) takes GPU
// i % count. The parent never initialises CUDA (CUDA forbids using it in a child forked after
// that): a child counts the GPUs first.
// Exit status: 0 every version verified, 1 a failure, 2 bad arguments, 77 this demo cannot run
// here (--device cuda without a usable GPU, or built without CUDA).
#include "processes.hpp"
#include "synthetic_model.hpp"

#include <shardline/plan/convert.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/transport/shm/transport.hpp>
#include <shardline/trace.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/weights_receiver.hpp>
#if SHARDLINE_HAVE_VERBS
#include <shardline/verbs.hpp>
#endif
#if SHARDLINE_DEMO_HAVE_CUDA
#include <shardline/cuda/async_wait.hpp>
#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/ipc_transport.hpp>
#include <shardline/cuda/staging.hpp>
#include <shardline/cuda/stream.hpp>
#endif

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace sl = shardline;
using namespace std::chrono_literals;

namespace {

// What the demo exits with when it cannot run here (as the hardware test suites skip).
constexpr int cannot_run_here = 77;

struct demo_args {
  std::string device = "host";
  std::string transport;  // default: shm on the host, ipc with --device cuda
  std::uint64_t model_bytes = 1ull << 30;
  std::int64_t experts = 0;
  std::size_t tp = 1, replicas = 1, senders = 1, depth = 2;
  std::uint64_t bucket_bytes = 64ull << 20;
  std::uint32_t versions = 2;
  std::string trace = "shardline-demo.trace.json";
  std::string address = "127.0.0.2";
};

demo_args parse(int argc, char** argv) {
  demo_args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      std::puts("usage: shardline_demo [--device host|cuda] [--transport shm|verbs|ipc] [--model-bytes 1G]\n"
                "       [--experts N] [--tp N] [--replicas N] [--senders N] [--bucket-bytes 64M]\n"
                "       [--depth N] [--versions N] [--trace FILE] [--address IPv4 (verbs)]\n"
                "  --device cuda: the weights on GPUs on both sides, over CUDA IPC (--transport ipc);\n"
                "  process i (receivers, then senders) uses GPU i % count. Exit status 77: cannot run\n"
                "  here (no usable GPU, or built without CUDA).");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument("option " + k + " needs a value");
    const std::string v = argv[++i];
    if (k == "--device") a.device = v;
    else if (k == "--transport") a.transport = v;
    else if (k == "--model-bytes") a.model_bytes = sl::examples::parse_bytes(v);
    else if (k == "--experts") a.experts = std::stoll(v);
    else if (k == "--tp") a.tp = std::stoul(v);
    else if (k == "--replicas") a.replicas = std::stoul(v);
    else if (k == "--senders") a.senders = std::stoul(v);
    else if (k == "--bucket-bytes") a.bucket_bytes = sl::examples::parse_bytes(v);
    else if (k == "--depth") a.depth = std::stoul(v);
    else if (k == "--versions") a.versions = static_cast<std::uint32_t>(std::stoul(v));
    else if (k == "--trace") a.trace = v;
    else if (k == "--address") a.address = v;
    else throw std::invalid_argument("unknown option " + k);
  }
  if (a.senders == 0) throw std::invalid_argument("--senders must be at least 1");
  if (a.device != "host" && a.device != "cuda")
    throw std::invalid_argument("--device must be host or cuda, not '" + a.device + "'");
  if (a.transport.empty()) a.transport = a.device == "cuda" ? "ipc" : "shm";
  if (a.device == "host" && a.transport == "ipc") a.device = "cuda";  // ipc moves device memory
  if (a.device == "host" && a.transport != "shm" && a.transport != "verbs")
    throw std::invalid_argument("--transport must be shm, verbs or ipc, not '" + a.transport + "'");
  if (a.device == "cuda" && a.transport != "ipc")
    throw std::invalid_argument("--device cuda moves device memory over CUDA IPC: --transport must be ipc, not '" +
                                a.transport + "'");
  return a;
}

double seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// ---- how each transport is set up on the two sides -------------------------------------

template <class T>
struct demo_transport;

template <>
struct demo_transport<sl::shm_transport> {
  // Every process is a child of the demo's parent, which names the sockets.
  static std::string address(const demo_args&, std::size_t r) {
    return "/tmp/shardline-demo-" + std::to_string(getppid()) + "-" + std::to_string(r) + ".sock";
  }
  static std::string trainer_address(const demo_args& a, std::size_t r) { return address(a, r); }
  static sl::shm_transport make(asio::io_context& io) { return sl::shm_transport(io.get_executor()); }
  static sl::shm_transport::receiver make_receiver(sl::shm_transport&, asio::io_context& io,
                                                   const demo_args& a, std::size_t r) {
    return sl::shm_transport::receiver(io.get_executor(), address(a, r));
  }
  template <class Token>
  static auto connect(sl::shm_transport& t, const demo_args& a, std::size_t r, sl::sender_identity who,
                      Token&& token) {
    return t.async_connect(trainer_address(a, r), who, std::forward<Token>(token));
  }
};

#if SHARDLINE_HAVE_VERBS
template <>
struct demo_transport<sl::verbs_transport> {
  static asio::ip::tcp::endpoint endpoint(const demo_args& a, std::size_t r) {
    return {asio::ip::make_address(a.address), static_cast<unsigned short>(18515 + r)};
  }
  // Every rank holds the run's key (main put it in the environment before forking them):
  // a process that does not hold it can reach the control ports, but not the weights.
  static constexpr const char* key_variable = "SHARDLINE_DEMO_KEY";
  static sl::verbs_transport make(asio::io_context& io) {
    sl::verbs::options o;
    o.key = sl::shared_key::from_environment(key_variable);
    return sl::verbs_transport(io.get_executor(), o);
  }
  static sl::verbs_transport::receiver make_receiver(sl::verbs_transport& t, asio::io_context&,
                                                      const demo_args& a, std::size_t r) {
    return sl::verbs_transport::receiver(t, endpoint(a, r));
  }
  template <class Token>
  static auto connect(sl::verbs_transport& t, const demo_args& a, std::size_t r, sl::sender_identity who,
                      Token&& token) {
    return t.async_connect(endpoint(a, r), who, std::forward<Token>(token));
  }
};
#endif

// ---- the rollout side ---------------------------------------------------------------------

// What receiver r must hold for `version`: each planned parameter built from the master
// values exactly as the trainer's loader builds it, then sliced by the plan's writes.
std::unordered_map<std::string, std::uint64_t> expected_checksums(const sl::transfer_plan& plan,
                                                                  std::size_t r,
                                                                  std::uint32_t version) {
  std::unordered_map<std::string, std::uint64_t> sums;
  std::vector<float> master;
  std::vector<std::byte> full, mine;
  for (const auto& exposed : plan.receiver_parameters(r)) {
    const sl::planned_parameter* p = plan.find(exposed.name);
    full.assign(p->parameter.destination.bytes(), std::byte{});
    for (const auto& shard : p->parameter.shards) {
      master.resize(shard.tensor.elements());
      sl::examples::fill_master(shard.tensor.name, version, master);
      sl::convert_f32_to_bf16(master, std::span(full).subspan(shard.offset, shard.tensor.bytes()));
    }
    mine.assign(exposed.bytes(), std::byte{});
    for (const auto& w : p->writes)
      if (w.receiver == r)
        std::memcpy(mine.data() + w.destination_offset, full.data() + w.staging_offset, w.bytes);
    sums[exposed.name] = sl::examples::checksum(mine);
  }
  return sums;
}

template <class Endpoint>
asio::awaitable<void> accept_senders(Endpoint& endpoint) {
  while (true) {
    auto [ec, sender] = co_await endpoint.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
    if (ec == asio::error::operation_aborted || ec == sl::errc::not_connected) co_return;
    if (ec) std::printf("a sender was refused: %s\n", ec.message().c_str());
    (void)sender;
  }
}

// Verifies each version as it commits, against the values receiver r computes itself, and
// tells the parent ('V' or 'F' on `report_fd`). `host_bytes(span)` gives a parameter's bytes
// in host memory; `where` is said after the parameter count.
template <class Weights, class HostBytes>
asio::awaitable<int> verify_versions(Weights& weights, const demo_args& a, const sl::transfer_plan& plan,
                                     std::size_t r, int report_fd, HostBytes host_bytes, std::string where) {
  int failures = 0;
  for (std::uint32_t n = 0; n < a.versions; ++n) {
    const std::uint32_t version = co_await weights.async_wait_commit(asio::use_awaitable);
    const auto expected = expected_checksums(plan, r, version);
    std::size_t bad = 0;
    for (const auto& p : weights.parameters())
      if (sl::examples::checksum(host_bytes(weights.parameter(p.name))) != expected.at(p.name)) {
        if (bad++ < 5) std::printf("receiver %zu: version %u: parameter '%s' checksum MISMATCH\n",
                                   r, version, p.name.c_str());
      }
    std::printf("receiver %zu: version %u %s: %zu parameters%s, %zu checksums match\n", r, version,
                bad ? "FAILED" : "verified", weights.parameters().size(), where.c_str(),
                weights.parameters().size() - bad);
    std::fflush(stdout);
    failures += bad != 0;
    const char verdict = bad ? 'F' : 'V';
    if (write(report_fd, &verdict, 1) != 1) ++failures;
  }
  co_return failures;
}

template <class T>
asio::awaitable<int> serve(T& transport, asio::io_context& io, const demo_args& a,
                           const sl::transfer_plan& plan, std::size_t r, int report_fd) {
  auto endpoint = demo_transport<T>::make_receiver(transport, io, a, r);
  sl::weights_receiver weights(endpoint, plan, r);
  // Senders come and go (a restarted trainer rank reconnects): accept for as long as we serve.
  asio::co_spawn(io, accept_senders(endpoint), asio::detached);
  const int failures = co_await verify_versions(
      weights, a, plan, r, report_fd, [](std::span<const std::byte> live) { return live; }, "");
  endpoint.close();
  co_return failures;
}

template <class T>
int run_receiver(const demo_args& a, const sl::transfer_plan& plan, std::size_t r, int report_fd) {
  try {
    asio::io_context io;
    T transport = demo_transport<T>::make(io);
    auto result = asio::co_spawn(io, serve(transport, io, a, plan, r, report_fd), asio::use_future);
    io.run();
    return result.get() == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "receiver %zu: %s\n", r, e.what());
    return 2;
  }
}

// ---- the trainer side ---------------------------------------------------------------------

template <class T>
asio::awaitable<typename T::connection> connect_with_retry(T& transport, const demo_args& a,
                                                          std::size_t r, sl::sender_identity who) {
  auto executor = co_await asio::this_coro::executor;
  for (int attempt = 0;; ++attempt) {
    auto [ec, connection] = co_await demo_transport<T>::connect(
        transport, a, r, who, asio::experimental::as_tuple(asio::use_awaitable));
    if (!ec) co_return std::move(connection);
    if (attempt == 200)  // the receiver had 20 s to start listening
      throw sl::error(ec, "receiver " + std::to_string(r) + ": connect failed: " + ec.message());
    asio::steady_timer pause(executor, 100ms);
    co_await pause.async_wait(asio::use_awaitable);
  }
}

void print_report(const sl::update_report& report, std::size_t depth, std::size_t receivers) {
  std::printf("\nversion %u, sender %u: %zu buckets, depth %zu\n", report.version, report.sender,
              report.buckets.size(), depth);
  std::printf("  bucket      MiB   load ms  transfer ms   transfer GB/s\n");
  for (const auto& b : report.buckets)
    std::printf("  %6zu %8.1f %9.2f %12.2f %15.2f\n", b.index, b.bytes / 1048576.0,
                seconds(b.load_time()) * 1e3, seconds(b.transfer_time()) * 1e3,
                b.bytes * receivers / 1e9 / std::max(seconds(b.transfer_time()), 1e-9));
  std::printf("  makespan %.1f ms, %.2f GB/s to %zu receiver(s); loader busy %.1f ms, link busy %.1f ms, "
              "lower bound %.1f ms, overlap efficiency %.3f\n",
              seconds(report.elapsed()) * 1e3, report.wire_bytes / 1e9 / seconds(report.elapsed()), receivers,
              seconds(report.load_busy()) * 1e3, seconds(report.transfer_busy()) * 1e3,
              seconds(report.lower_bound()) * 1e3, report.overlap_efficiency());
}

// The host trainer's weights: float32 masters of the tensors the rank holds, converted to
// bf16 into the pipeline's (host) staging by a loader on the pipeline's thread.
struct host_trainer_weights {
  using staging_type = sl::host_staging;
  std::map<std::string, std::vector<float>> masters;

  void hold(const sl::transfer_plan& plan) {
    for (const auto& b : plan.buckets())
      for (const auto& p : b.parameters)
        for (const auto& s : p.parameter.shards) masters[s.tensor.name].resize(s.tensor.elements());
  }
  // The training step: this version's values.
  void step(std::uint32_t version) {
    for (auto& [name, values] : masters) sl::examples::fill_master(name, version, values);
  }
  staging_type staging() const { return {}; }
  // The per-shard work a real loader does: convert to the inference dtype in place.
  auto loader() {
    return [this](const sl::shard_load& load) {
      sl::convert_f32_to_bf16(masters.at(load.tensor.name), load.staging);
    };
  }
};

// One trainer rank: pushes each version when the parent says 'g' on `go`, answers on `done`
// ('D' pushed, 'F' failed); 'q' ends it. The parent waits for every receiver's verdict
// between versions, so no version overwrites one still being verified. `Weights` says where
// the rank's weights live and how a shard is loaded (host_trainer_weights, gpu_trainer_weights).
template <class T, class Weights>
asio::awaitable<int> train(T& transport, const demo_args& a, const sl::transfer_plan& plan, std::size_t sender,
                           int go_fd, int done_fd, Weights& weights) {
  auto executor = co_await asio::this_coro::executor;
  const sl::sender_identity who{static_cast<std::uint32_t>(sender), plan.fingerprint()};
  std::vector<typename T::connection> connections;
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    connections.push_back(co_await connect_with_retry(transport, a, r, who));
  std::vector<typename T::connection*> receivers;
  for (auto& c : connections) receivers.push_back(&c);

  using loader_type = decltype(weights.loader());
  using config = sl::pipeline_config<2, sl::chrome_tracer, 64, (std::uint64_t(1) << 30),
                                     typename Weights::staging_type>;
  sl::pipeline_options options;
  options.depth = a.depth;
  // An asynchronous loader runs on the io_context: no loader thread.
  if constexpr (std::is_same_v<std::invoke_result_t<loader_type&, const sl::shard_load&>, asio::awaitable<void>>)
    options.loader_threads = 0;
  sl::update_pipeline<T, config> pipeline(transport, plan.senders() > 1 ? plan.for_sender(sender) : plan,
                                          receivers, options, weights.staging());
  weights.hold(pipeline.plan());

  asio::posix::stream_descriptor go(executor, go_fd);
  int failures = 0;
  for (std::uint32_t version = 1;; ++version) {
    char command = 0;
    co_await asio::async_read(go, asio::buffer(&command, 1), asio::use_awaitable);
    if (command != 'g') break;
    char answer = 'D';
    try {
      weights.step(version);
      const sl::update_report report = co_await pipeline.async_update(version, weights.loader(), asio::use_awaitable);
      if (sender == 0) print_report(report, pipeline.depth(), plan.receivers());
      else
        std::printf("version %u, sender %zu: %.1f ms, %.2f GB/s written, overlap efficiency %.3f\n", version,
                    sender, seconds(report.elapsed()) * 1e3, report.wire_bytes / 1e9 / seconds(report.elapsed()),
                    report.overlap_efficiency());
    } catch (const std::exception& e) {
      std::printf("version %u, sender %zu: FAILED: %s\n", version, sender, e.what());
      answer = 'F';
      ++failures;
    }
    std::fflush(stdout);
    if (write(done_fd, &answer, 1) != 1) ++failures;
  }
  if (sender == 0) {
    std::error_code ec;
    pipeline.tracer().write_file(a.trace, ec);
    if (ec) std::printf("could not write trace %s: %s\n", a.trace.c_str(), ec.message().c_str());
    else std::printf("\ntrace: %s (%zu events of sender 0; open in Perfetto)\n", a.trace.c_str(),
                     pipeline.tracer().size());
  }
  for (auto& c : connections) c.close();
  co_return failures;
}

template <class T>
int run_sender(const demo_args& a, const sl::transfer_plan& plan, std::size_t s, int go_fd, int done_fd) {
  try {
    asio::io_context io;
    T transport = demo_transport<T>::make(io);
    host_trainer_weights weights;
    auto result = asio::co_spawn(io, train(transport, a, plan, s, go_fd, done_fd, weights), asio::use_future);
    io.run();
    return result.get() == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sender %zu: %s\n", s, e.what());
    return 2;
  }
}

// Forks every rank: receiver(r, report_fd) for each receiver, then sender(s, go_fd, done_fd)
// for each sender (each returns its exit status), and drives the versions.
template <class Receiver, class Sender>
int run_ranks(const demo_args& a, const sl::transfer_plan& plan, Receiver receiver, Sender sender) {
  // Every rank is a child process; the parent only orchestrates (and never polls or threads).
  std::vector<pid_t> children;
  std::vector<int> verdicts, go, done;
  for (std::size_t r = 0; r < plan.receivers(); ++r) {
    int unused = -1, verdict = -1;
    children.push_back(sl::examples::fork_with_pipes(
        [&](int, int report_fd) { return receiver(r, report_fd); }, unused, verdict));
    close(unused);
    verdicts.push_back(verdict);
  }
  for (std::size_t s = 0; s < plan.senders(); ++s) {
    int to = -1, from = -1;
    children.push_back(sl::examples::fork_with_pipes(
        [&](int go_fd, int done_fd) { return sender(s, go_fd, done_fd); }, to, from));
    go.push_back(to);
    done.push_back(from);
  }
  int failures = 0;
  for (std::uint32_t version = 1; version <= a.versions; ++version) {
    for (int fd : go)
      if (write(fd, "g", 1) != 1) ++failures;
    for (int fd : done) {
      char answer = 0;
      if (read(fd, &answer, 1) != 1 || answer != 'D') ++failures;
    }
    // Every receiver verifies the version before the senders overwrite it.
    for (int fd : verdicts) {
      char verdict = 0;
      if (read(fd, &verdict, 1) != 1 || verdict != 'V') ++failures;
    }
    if (failures) break;
  }
  for (int fd : go)
    if (write(fd, "q", 1) != 1) ++failures;
  if (failures)
    for (pid_t c : children) kill(c, SIGTERM);
  for (pid_t c : children) {
    int status = 0;
    waitpid(c, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++failures;
  }
  std::printf("\nverification: %s\n", failures ? "FAILED" : "every parameter of every version "
                                                           "verified on every receiver");
  return failures ? 1 : 0;
}

template <class T>
int run_demo(const demo_args& a, const sl::transfer_plan& plan) {
  return run_ranks(
      a, plan, [&](std::size_t r, int report_fd) { return run_receiver<T>(a, plan, r, report_fd); },
      [&](std::size_t s, int go_fd, int done_fd) { return run_sender<T>(a, plan, s, go_fd, done_fd); });
}

#if SHARDLINE_DEMO_HAVE_CUDA
// ---- --device cuda: the weights on GPUs on both sides, over CUDA IPC ----------------------

namespace cuda = shardline::cuda;

template <>
struct demo_transport<cuda::ipc_transport> {
  static std::string address(const demo_args&, std::size_t r) {
    return "/tmp/shardline-demo-" + std::to_string(getppid()) + "-ipc-" + std::to_string(r) + ".sock";
  }
  template <class Token>
  static auto connect(cuda::ipc_transport& t, const demo_args& a, std::size_t r, sl::sender_identity who,
                      Token&& token) {
    return t.async_connect(address(a, r), who, std::forward<Token>(token));
  }
};

// "GPU 1 (NVIDIA H200, 0000:19:00.0)", for the log: which GPU a process uses.
std::string describe_gpu(int gpu) {
  cudaDeviceProp p{};
  cuda::throw_if(cudaGetDeviceProperties(&p, gpu), "cudaGetDeviceProperties of GPU " + std::to_string(gpu));
  char bus[32] = "";
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, gpu) != cudaSuccess) (void)cudaGetLastError();
  return "GPU " + std::to_string(gpu) + " (" + p.name + (bus[0] ? std::string(", ") + bus : std::string()) + ")";
}

// Counts the GPUs in a child: this process must not initialise CUDA, since it forks the ranks
// later. Returns the count; 0 with the reason in `why` when none is usable.
int count_gpus(std::string& why) {
  int to = -1, from = -1;
  const pid_t pid = sl::examples::fork_with_pipes(
      [](int, int out) {
        const int n = cuda::device_count();
        const std::string answer = std::to_string(n) + " " + (n > 0 ? std::string() : cuda::unavailable_reason());
        return write(out, answer.data(), answer.size()) == static_cast<ssize_t>(answer.size()) ? 0 : 1;
      },
      to, from);
  close(to);
  std::string answer;
  char chunk[256];
  for (ssize_t n; (n = read(from, chunk, sizeof chunk)) > 0;) answer.append(chunk, static_cast<std::size_t>(n));
  close(from);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || answer.empty()) {
    why = "the process that counts the GPUs failed";
    return 0;
  }
  const int count = std::atoi(answer.c_str());
  if (count == 0) why = answer.substr(answer.find(' ') + 1);
  return count;
}

template <class Weights, class HostBytes>
asio::awaitable<int> serve_adopted(cuda::ipc_transport::receiver& endpoint, Weights& weights, const demo_args& a,
                                   const sl::transfer_plan& plan, std::size_t r, int report_fd, HostBytes host_bytes,
                                   std::string where) {
  asio::co_spawn(endpoint.get_executor(), accept_senders(endpoint), asio::detached);
  const int failures = co_await verify_versions(weights, a, plan, r, report_fd, std::move(host_bytes), std::move(where));
  endpoint.close();
  co_return failures;
}

// The rollout side: the engine's tensors in one allocation of this process's GPU (as an
// engine's allocator holds them), adopted by the weights_receiver, which exposes them over
// CUDA IPC; each version is verified by copying every parameter back to the host.
int run_gpu_receiver(const demo_args& a, const sl::transfer_plan& plan, std::size_t r, int gpu, int report_fd) {
  try {
    cuda::throw_if(cudaSetDevice(gpu), "cudaSetDevice(" + std::to_string(gpu) + ")");
    asio::io_context io;
    cuda::ipc_options o;
    o.device = gpu;
    cuda::ipc_transport::receiver endpoint(io.get_executor(), demo_transport<cuda::ipc_transport>::address(a, r), o);
    const auto parameters = plan.receiver_parameters(r);
    const auto aligned = [](std::size_t n) { return (n + 255) / 256 * 256; };
    std::size_t total = 0;
    for (const auto& p : parameters) total += aligned(p.bytes());
    cuda::device_buffer engine(std::max<std::size_t>(total, 1), gpu);
    // Poisoned: a byte no sender wrote fails the verification.
    cuda::throw_if(cudaMemset(engine.data(), 0xff, engine.size()), "cudaMemset of the engine's tensors");
    std::vector<sl::engine_tensor> tensors;
    std::size_t at = 0;
    for (const auto& p : parameters) {
      tensors.push_back({p.name, p.type, p.shape, std::span(engine.data() + at, p.bytes()), sl::memory_location::cuda(gpu)});
      at += aligned(p.bytes());
    }
    sl::weights_receiver<cuda::ipc_transport::receiver> weights(endpoint, plan, r, std::move(tensors));
    std::printf("receiver %zu: %s, pid %d: %zu engine tensors, %.2f GiB of device memory, exported in %zu "
                "allocation(s)\n",
                r, describe_gpu(gpu).c_str(), static_cast<int>(getpid()), parameters.size(),
                total / double(1ull << 30), endpoint.exported_allocations());
    std::fflush(stdout);
    const auto to_host = [host = std::vector<std::byte>()](std::span<const std::byte> live) mutable {
      host.resize(live.size());
      cuda::throw_if(cudaMemcpy(host.data(), live.data(), live.size(), cudaMemcpyDeviceToHost),
                     "cudaMemcpy of a parameter to the host");
      return std::span<const std::byte>(host);
    };
    auto result = asio::co_spawn(
        io, serve_adopted(endpoint, weights, a, plan, r, report_fd, to_host, " (copied back from GPU " + std::to_string(gpu) + ")"),
        asio::use_future);
    io.run();
    return result.get() == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "receiver %zu: %s\n", r, e.what());
    return 2;
  }
}

// The GPU trainer's weights: the rank's tensors, bf16, on its GPU. The training step writes
// this version's values there; the loader copies a shard into the pipeline's device staging
// with cudaMemcpyAsync on the rank's stream and awaits it with cuda::async_wait, so the shard
// counts as loaded once the GPU is done with it.
struct gpu_trainer_weights {
  using staging_type = cuda::device_staging;
  int gpu = 0;
  cuda::stream copies;
  std::map<std::string, cuda::device_buffer> tensors;

  explicit gpu_trainer_weights(int device) : gpu(device), copies(device) {}

  void hold(const sl::transfer_plan& plan) {
    std::uint64_t bytes = 0;
    for (const auto& b : plan.buckets())
      for (const auto& p : b.parameters)
        for (const auto& s : p.parameter.shards)
          if (!tensors.contains(s.tensor.name)) {
            tensors.emplace(s.tensor.name, cuda::device_buffer(s.tensor.bytes(), gpu));
            bytes += s.tensor.bytes();
          }
    std::printf("sender %zu: holds %zu tensors, %.2f GiB, on GPU %d\n", static_cast<std::size_t>(plan.sender().value_or(0)),
                tensors.size(), bytes / double(1ull << 30), gpu);
    std::fflush(stdout);
  }
  // The training step, outside the update: float32 masters on the host, converted to bf16
  // and copied to the GPU.
  void step(std::uint32_t version) {
    std::vector<float> master;
    std::vector<std::byte> bf16;
    for (auto& [name, t] : tensors) {
      master.resize(t.size() / 2);
      bf16.resize(t.size());
      sl::examples::fill_master(name, version, master);
      sl::convert_f32_to_bf16(master, bf16);
      cuda::throw_if(cudaMemcpy(t.data(), bf16.data(), t.size(), cudaMemcpyHostToDevice), "cudaMemcpy of '" + name + "'");
    }
    // A copy from pageable memory may return before its DMA is done, and the loader's stream
    // does not wait for the legacy default stream.
    cuda::throw_if(cudaDeviceSynchronize(), "cudaDeviceSynchronize after the training step");
  }
  staging_type staging() const { return {gpu}; }
  auto loader() {
    return [this](const sl::shard_load& load) { return load_shard(this, load); };
  }

  static asio::awaitable<void> load_shard(gpu_trainer_weights* self, sl::shard_load load) {
    const cuda::device_buffer& source = self->tensors.at(load.tensor.name);
    cuda::throw_if(cudaMemcpyAsync(load.staging.data(), source.data(), load.staging.size(), cudaMemcpyDeviceToDevice,
                                   self->copies.native_handle()),
                   "cudaMemcpyAsync of '" + load.tensor.name + "' into the staging");
    const auto executor = co_await asio::this_coro::executor;
    co_await cuda::async_wait(executor, self->copies, asio::use_awaitable);
  }
};

int run_gpu_sender(const demo_args& a, const sl::transfer_plan& plan, std::size_t s, int gpu, int go_fd, int done_fd) {
  try {
    cuda::throw_if(cudaSetDevice(gpu), "cudaSetDevice(" + std::to_string(gpu) + ")");
    asio::io_context io;
    cuda::ipc_options o;
    o.device = gpu;
    cuda::ipc_transport transport(io.get_executor(), o);
    gpu_trainer_weights weights(gpu);
    std::printf("sender %zu: %s, pid %d\n", s, describe_gpu(gpu).c_str(), static_cast<int>(getpid()));
    std::fflush(stdout);
    auto result = asio::co_spawn(io, train(transport, a, plan, s, go_fd, done_fd, weights), asio::use_future);
    io.run();
    return result.get() == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sender %zu: %s\n", s, e.what());
    return 2;
  }
}

int run_cuda_demo(const demo_args& a, const sl::transfer_plan& plan, int gpus) {
  // Process i, receivers first, then senders, takes GPU i % gpus.
  const auto gpu_of = [&](std::size_t process) { return static_cast<int>(process % static_cast<std::size_t>(gpus)); };
  std::printf("GPUs: %d; receivers on", gpus);
  for (std::size_t r = 0; r < plan.receivers(); ++r) std::printf(" %d", gpu_of(r));
  std::printf(", senders on");
  for (std::size_t s = 0; s < plan.senders(); ++s) std::printf(" %d", gpu_of(plan.receivers() + s));
  std::printf("\n");
  std::fflush(stdout);
  return run_ranks(
      a, plan,
      [&](std::size_t r, int report_fd) { return run_gpu_receiver(a, plan, r, gpu_of(r), report_fd); },
      [&](std::size_t s, int go_fd, int done_fd) {
        return run_gpu_sender(a, plan, s, gpu_of(plan.receivers() + s), go_fd, done_fd);
      });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  try {
    const demo_args a = parse(argc, argv);
    [[maybe_unused]] int gpus = 0;
    if (a.device == "cuda") {
#if SHARDLINE_DEMO_HAVE_CUDA
      std::string why;
      gpus = count_gpus(why);
      if (gpus == 0) {
        std::fprintf(stderr, "shardline_demo: --device cuda: no GPU is usable here: %s\n", why.c_str());
        return cannot_run_here;
      }
#else
      std::fprintf(stderr, "shardline_demo: --device cuda: this demo was built without CUDA (the CUDA Toolkit was "
                           "not found when it was configured; configure where it is, or set CUDAToolkit_ROOT)\n");
      return cannot_run_here;
#endif
    }
    const auto model = sl::examples::model_config::of_size(a.model_bytes, a.experts);
    const auto tensors = model.tensors();
    sl::plan_options options;
    options.tensor_parallel = a.tp;
    options.replicas = a.replicas;
    options.bucket_bytes = a.bucket_bytes;
    options.senders = a.senders;
    // q, k and v of each layer on different ranks; everything else by layer.
    options.sender_of = [n = a.senders](const sl::parameter_descriptor& t) -> std::size_t {
      std::size_t layer = 0;
      if (const auto at = t.name.find("layers."); at != std::string::npos)
        layer = std::strtoul(t.name.c_str() + at + 7, nullptr, 10);
      std::size_t shift = 0;
      if (t.name.find("k_proj") != std::string::npos) shift = 1;
      if (t.name.find("v_proj") != std::string::npos) shift = 2;
      return (layer + shift) % n;
    };
    const auto plan = sl::transfer_plan::build(tensors, sl::shard_map::standard(), options);
    std::size_t parameters = 0;
    for (const auto& b : plan.buckets()) parameters += b.parameters.size();
    std::printf("shardline demo: transport %s%s, synthetic Qwen-style model: %lld layers, hidden "
                "%lld%s, %.2f GiB bf16, %zu tensors -> %zu parameters in %zu buckets of <= %.0f "
                "MiB; %zu sender(s), %zu receiver(s) (tp %zu x replicas %zu), depth %zu, %u versions\n",
                a.transport.c_str(), a.device == "cuda" ? ", weights on GPUs" : "", static_cast<long long>(model.layers),
                static_cast<long long>(model.hidden),
                model.experts ? (", " + std::to_string(model.experts) + " experts").c_str() : "",
                plan.total_bytes() / double(1ull << 30), tensors.size(), parameters,
                plan.buckets().size(), a.bucket_bytes / 1048576.0, a.senders, plan.receivers(), a.tp,
                a.replicas, a.depth, a.versions);
    std::fflush(stdout);
#if SHARDLINE_DEMO_HAVE_CUDA
    if (a.device == "cuda") return run_cuda_demo(a, plan, gpus);
#endif
    if (a.transport == "shm") return run_demo<sl::shm_transport>(a, plan);
#if SHARDLINE_HAVE_VERBS
    // One key per run, unless the caller gave one (to run ranks on other hosts).
    if (!std::getenv(demo_transport<sl::verbs_transport>::key_variable))
      ::setenv(demo_transport<sl::verbs_transport>::key_variable, sl::shared_key::generate().hex().c_str(), 1);
    return run_demo<sl::verbs_transport>(a, plan);
#else
    std::fprintf(stderr, "this build has no verbs support (libibverbs was not found)\n");
    return 2;
#endif
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shardline_demo: %s\n", e.what());
    return 2;
  }
}
