// shardline demo: a trainer process pushes weight versions of a synthetic Qwen-style model
// into rollout processes (one per receiver), over shm by default or verbs.
//
//   shardline_demo [--transport shm|verbs] [--model-bytes 1G] [--experts N] [--tp N]
//                  [--replicas N] [--senders N] [--bucket-bytes 64M] [--depth 2]
//                  [--versions 2] [--trace FILE] [--address 127.0.0.2]
//
// Every sender (trainer rank) and every receiver (rollout rank) is a process of its own.
// With --senders N the trainer's tensors are spread over N ranks, q, k and v of each layer
// on different ranks, and each rank writes its shards straight into the receivers' fused
// parameters. Each rollout process verifies every parameter of every version by checksum
// against the values it computes itself, and tells the parent over a pipe; the exit status
// is 0 only when every receiver verified every version.
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
#include <unordered_map>
#include <vector>

namespace sl = shardline;
using namespace std::chrono_literals;

namespace {

struct demo_args {
  std::string transport = "shm";
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
      std::puts("usage: shardline_demo [--transport shm|verbs] [--model-bytes 1G] [--experts N]\n"
                "       [--tp N] [--replicas N] [--senders N] [--bucket-bytes 64M] [--depth N]\n"
                "       [--versions N]\n"
                "       [--trace FILE] [--address IPv4 (verbs)]");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument("option " + k + " needs a value");
    const std::string v = argv[++i];
    if (k == "--transport") a.transport = v;
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
  if (a.transport != "shm" && a.transport != "verbs")
    throw std::invalid_argument("--transport must be shm or verbs, not '" + a.transport + "'");
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

template <class T>
asio::awaitable<int> serve(T& transport, asio::io_context& io, const demo_args& a,
                           const sl::transfer_plan& plan, std::size_t r, int report_fd) {
  auto endpoint = demo_transport<T>::make_receiver(transport, io, a, r);
  sl::weights_receiver weights(endpoint, plan, r);
  // Senders come and go (a restarted trainer rank reconnects): accept for as long as we serve.
  asio::co_spawn(io, accept_senders(endpoint), asio::detached);
  int failures = 0;
  for (std::uint32_t n = 0; n < a.versions; ++n) {
    const std::uint32_t version = co_await weights.async_wait_commit(asio::use_awaitable);
    const auto expected = expected_checksums(plan, r, version);
    std::size_t bad = 0;
    for (const auto& p : weights.parameters())
      if (sl::examples::checksum(weights.parameter(p.name)) != expected.at(p.name)) {
        if (bad++ < 5) std::printf("receiver %zu: version %u: parameter '%s' checksum MISMATCH\n",
                                   r, version, p.name.c_str());
      }
    std::printf("receiver %zu: version %u %s: %zu parameters, %zu checksums match\n", r, version,
                bad ? "FAILED" : "verified", weights.parameters().size(),
                weights.parameters().size() - bad);
    std::fflush(stdout);
    failures += bad != 0;
    const char verdict = bad ? 'F' : 'V';
    if (write(report_fd, &verdict, 1) != 1) ++failures;
  }
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

using demo_pipeline_config = sl::pipeline_config<2, sl::chrome_tracer>;

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

// One trainer rank: pushes each version when the parent says 'g' on `go`, answers on `done`
// ('D' pushed, 'F' failed); 'q' ends it. The parent waits for every receiver's verdict
// between versions, so no version overwrites one still being verified.
template <class T>
asio::awaitable<int> train(T& transport, const demo_args& a, const sl::transfer_plan& plan, std::size_t sender,
                           int go_fd, int done_fd) {
  auto executor = co_await asio::this_coro::executor;
  const sl::sender_identity who{static_cast<std::uint32_t>(sender), plan.fingerprint()};
  std::vector<typename T::connection> connections;
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    connections.push_back(co_await connect_with_retry(transport, a, r, who));
  std::vector<typename T::connection*> receivers;
  for (auto& c : connections) receivers.push_back(&c);

  sl::pipeline_options options;
  options.depth = a.depth;
  sl::update_pipeline<T, demo_pipeline_config> pipeline(
      transport, plan.senders() > 1 ? plan.for_sender(sender) : plan, receivers, options);

  // This rank's float32 master weights, one buffer per source tensor it holds.
  std::map<std::string, std::vector<float>> masters;
  for (const auto& b : pipeline.plan().buckets())
    for (const auto& p : b.parameters)
      for (const auto& s : p.parameter.shards) masters[s.tensor.name].resize(s.tensor.elements());

  asio::posix::stream_descriptor go(executor, go_fd);
  int failures = 0;
  for (std::uint32_t version = 1;; ++version) {
    char command = 0;
    co_await asio::async_read(go, asio::buffer(&command, 1), asio::use_awaitable);
    if (command != 'g') break;
    for (auto& [name, values] : masters) sl::examples::fill_master(name, version, values);
    // The per-shard work a real loader does: convert to the inference dtype in place.
    auto loader = [&masters](const sl::shard_load& load) {
      sl::convert_f32_to_bf16(masters.at(load.tensor.name), load.staging);
    };
    char answer = 'D';
    try {
      const sl::update_report report = co_await pipeline.async_update(version, loader, asio::use_awaitable);
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
    auto result = asio::co_spawn(io, train(transport, a, plan, s, go_fd, done_fd), asio::use_future);
    io.run();
    return result.get() == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sender %zu: %s\n", s, e.what());
    return 2;
  }
}

template <class T>
int run_demo(const demo_args& a, const sl::transfer_plan& plan) {
  // Every rank is a child process; the parent only orchestrates (and never polls or threads).
  std::vector<pid_t> children;
  std::vector<int> verdicts, go, done;
  for (std::size_t r = 0; r < plan.receivers(); ++r) {
    int unused = -1, verdict = -1;
    children.push_back(sl::examples::fork_with_pipes(
        [&](int, int report_fd) { return run_receiver<T>(a, plan, r, report_fd); }, unused, verdict));
    close(unused);
    verdicts.push_back(verdict);
  }
  for (std::size_t s = 0; s < plan.senders(); ++s) {
    int to = -1, from = -1;
    children.push_back(sl::examples::fork_with_pipes(
        [&](int go_fd, int done_fd) { return run_sender<T>(a, plan, s, go_fd, done_fd); }, to, from));
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

}  // namespace

int main(int argc, char** argv) {
  try {
    const demo_args a = parse(argc, argv);
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
    std::printf("shardline demo: transport %s, synthetic Qwen-style model: %lld layers, hidden "
                "%lld%s, %.2f GiB bf16, %zu tensors -> %zu parameters in %zu buckets of <= %.0f "
                "MiB; %zu sender(s), %zu receiver(s) (tp %zu x replicas %zu), depth %zu, %u versions\n",
                a.transport.c_str(), static_cast<long long>(model.layers),
                static_cast<long long>(model.hidden),
                model.experts ? (", " + std::to_string(model.experts) + " experts").c_str() : "",
                plan.total_bytes() / double(1ull << 30), tensors.size(), parameters,
                plan.buckets().size(), a.bucket_bytes / 1048576.0, a.senders, plan.receivers(), a.tp,
                a.replicas, a.depth, a.versions);
    std::fflush(stdout);
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
