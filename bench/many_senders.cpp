// many_senders: the same update pushed by 4 trainer ranks (processes) into 2 rollout ranks
// (processes, tensor parallel 2) over shm, against 1 rank pushing the same bytes, in one run.
//
//   bench_many_senders [--model-bytes 256M] [--versions 5] [--senders 4] [--json]
//
// Every rank is a process. The 4 ranks hold the synthetic model's tensors round-robin by
// source tensor (q, k and v of a layer on different ranks), each writing its shards straight
// into the receivers' fused parameters; the single rank holds all of them. The loader stamps
// each shard with the version (memset), so the figure is the transfer path's, not a
// converter's. A version's time runs from the parent's "go" to the last rank's "done", which
// each rank says after every receiver acknowledged its commit. Receivers check every byte of
// the last version. Result: aggregate GB/s written (summed over receivers), median over the
// versions after a warm-up; baseline: the single rank's; ratio = value / baseline.
#include "../examples/processes.hpp"
#include "../examples/synthetic_model.hpp"

#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/transport/shm/transport.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace sl = shardline;
using namespace std::chrono_literals;

namespace {

struct options {
  std::uint64_t model_bytes = 256ull << 20;
  std::uint32_t versions = 5;
  std::size_t senders = 4;
  bool json = false;
};

sl::transfer_plan plan_for(const std::vector<sl::parameter_descriptor>& tensors, std::size_t senders) {
  sl::plan_options o;
  o.tensor_parallel = 2;
  o.bucket_bytes = 32ull << 20;
  o.senders = senders;
  std::vector<std::vector<std::string>> held(senders);
  for (std::size_t i = 0; i < tensors.size(); ++i) held[i % senders].push_back(tensors[i].name);
  o.sender_tensors = std::move(held);
  return sl::transfer_plan::build(tensors, sl::shard_map::standard(), o);
}

std::string socket_path(std::size_t senders, std::size_t r) {
  return "/tmp/shardline-bench-senders-" + std::to_string(getppid()) + "-" + std::to_string(senders) + "-" +
         std::to_string(r) + ".sock";
}

asio::awaitable<void> accept_senders(sl::shm_transport::receiver& endpoint) {
  while (true) {
    auto [ec, sender] = co_await endpoint.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
    (void)sender;
    if (ec == asio::error::operation_aborted || ec == sl::errc::not_connected) co_return;
  }
}

// A rollout rank: waits for `versions` commits, then checks that every byte holds the last
// version's stamp. Exit status 0: verified.
asio::awaitable<int> serve(sl::shm_transport::receiver& endpoint, const sl::transfer_plan& plan, std::size_t r,
                           std::uint32_t versions) {
  sl::weights_receiver<sl::shm_transport::receiver> weights(endpoint, plan, r);
  asio::co_spawn(co_await asio::this_coro::executor, accept_senders(endpoint), asio::detached);
  std::uint32_t last = 0;
  for (std::uint32_t n = 0; n < versions; ++n) last = co_await weights.async_wait_commit(asio::use_awaitable);
  int bad = 0;
  for (const auto& p : weights.parameters())
    for (auto b : weights.parameter(p.name)) bad += b != static_cast<std::byte>(last);
  endpoint.close();
  co_return bad ? 3 : 0;
}

int run_receiver(const sl::transfer_plan& plan, std::size_t r, std::uint32_t versions) {
  try {
    asio::io_context io;
    sl::shm_transport::receiver endpoint(io.get_executor(), socket_path(plan.senders(), r));
    auto f = asio::co_spawn(io, serve(endpoint, plan, r, versions), asio::use_future);
    io.run();
    return f.get();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "receiver %zu: %s\n", r, e.what());
    return 4;
  }
}

asio::awaitable<int> push(sl::shm_transport& t, const sl::transfer_plan& plan, std::size_t s, int go_fd, int done_fd) {
  auto ex = co_await asio::this_coro::executor;
  std::vector<sl::shm_transport::connection> conns;
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    for (int attempt = 0;; ++attempt) {
      auto [ec, c] = co_await t.async_connect(socket_path(plan.senders(), r),
                                              {static_cast<std::uint32_t>(s), plan.fingerprint()},
                                              asio::experimental::as_tuple(asio::use_awaitable));
      if (!ec) {
        conns.push_back(std::move(c));
        break;
      }
      if (attempt > 300) throw sl::error(ec, "connect to receiver " + std::to_string(r));
      asio::steady_timer pause(ex, 20ms);
      co_await pause.async_wait(asio::use_awaitable);
    }
  std::vector<sl::shm_transport::connection*> links;
  for (auto& c : conns) links.push_back(&c);
  sl::update_pipeline<sl::shm_transport> pipeline(t, plan.senders() > 1 ? plan.for_sender(s) : plan, links);
  auto stamp = [](const sl::shard_load& load) {
    std::memset(load.staging.data(), static_cast<int>(load.version & 0xff), load.staging.size());
  };
  asio::posix::stream_descriptor go(ex, go_fd);
  for (std::uint32_t version = 1;; ++version) {
    char command = 0;
    co_await asio::async_read(go, asio::buffer(&command, 1), asio::use_awaitable);
    if (command != 'g') break;
    co_await pipeline.async_update(version, stamp, asio::use_awaitable);
    if (write(done_fd, "D", 1) != 1) co_return 1;
  }
  co_return 0;
}

int run_sender(const sl::transfer_plan& plan, std::size_t s, int go_fd, int done_fd) {
  try {
    asio::io_context io;
    sl::shm_transport transport(io.get_executor());
    auto f = asio::co_spawn(io, push(transport, plan, s, go_fd, done_fd), asio::use_future);
    io.run();
    return f.get();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sender %zu: %s\n", s, e.what());
    if (write(done_fd, "F", 1) != 1) return 2;
    return 2;
  }
}

// Median seconds per version (after one warm-up) of `plan`'s senders; 0 on failure.
double measure(const sl::transfer_plan& plan, std::uint32_t versions) {
  std::vector<pid_t> children;
  for (std::size_t r = 0; r < plan.receivers(); ++r) {
    int to = -1, from = -1;
    children.push_back(sl::examples::fork_with_pipes(
        [&](int, int) { return run_receiver(plan, r, versions + 1); }, to, from));
    close(to);
    close(from);
  }
  std::vector<int> go, done;
  for (std::size_t s = 0; s < plan.senders(); ++s) {
    int to = -1, from = -1;
    children.push_back(sl::examples::fork_with_pipes(
        [&](int go_fd, int done_fd) { return run_sender(plan, s, go_fd, done_fd); }, to, from));
    go.push_back(to);
    done.push_back(from);
  }
  std::vector<double> times;
  bool ok = true;
  for (std::uint32_t v = 0; v <= versions && ok; ++v) {
    const auto start = std::chrono::steady_clock::now();
    for (int fd : go) ok = ok && write(fd, "g", 1) == 1;
    for (int fd : done) {
      char answer = 0;
      ok = ok && read(fd, &answer, 1) == 1 && answer == 'D';
    }
    if (v > 0) times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  for (int fd : go)
    if (write(fd, "q", 1) != 1) ok = false;
  if (!ok)
    for (pid_t c : children) kill(c, SIGTERM);
  for (pid_t c : children) {
    int status = 0;
    waitpid(c, &status, 0);
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  if (!ok || times.empty()) return 0;
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) try {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    const auto value = [&] {
      if (i + 1 >= argc) throw std::invalid_argument(k + " needs a value");
      return std::string(argv[++i]);
    };
    if (k == "--json") o.json = true;
    else if (k == "--model-bytes") o.model_bytes = sl::examples::parse_bytes(value());
    else if (k == "--versions") o.versions = static_cast<std::uint32_t>(std::stoul(value()));
    else if (k == "--senders") o.senders = std::stoul(value());
    else {
      std::fprintf(stderr, "usage: bench_many_senders [--model-bytes 256M] [--versions 5] [--senders 4] [--json]\n");
      return 2;
    }
  }
  const auto tensors = sl::examples::model_config::of_size(o.model_bytes, 0).tensors();
  const auto one = plan_for(tensors, 1);
  const auto many = plan_for(tensors, o.senders);
  const double wire = static_cast<double>(one.total_bytes());  // tp 2: each receiver half, summed: the whole
  const double t_one = measure(one, o.versions);
  const double t_many = measure(many, o.versions);
  if (t_one <= 0 || t_many <= 0) {
    std::fprintf(stderr, "bench_many_senders: a rank failed or a receiver found a wrong byte\n");
    return 1;
  }
  const double gbps_one = wire / t_one / 1e9, gbps_many = wire / t_many / 1e9;
  if (o.json) {
    std::printf("{\"name\":\"many_senders\",\"value\":%.3f,\"unit\":\"GB/s\",\"baseline\":%.3f,\"ratio\":%.3f}\n",
                gbps_many, gbps_one, gbps_many / gbps_one);
  } else {
    std::printf("many_senders: %.0f MiB, tp 2 receivers (processes), median of %u versions\n",
                wire / 1048576.0, o.versions);
    std::printf("  %zu sender processes  %8.1f ms  %6.2f GB/s\n", o.senders, t_many * 1e3, gbps_many);
    std::printf("  1 sender process    %8.1f ms  %6.2f GB/s\n", t_one * 1e3, gbps_one);
    std::printf("  ratio %.3f\n", gbps_many / gbps_one);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_many_senders: %s\n", e.what());
  return 2;
}
