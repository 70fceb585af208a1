#include <shardline/pipeline.hpp>

#include <shardline/shard_map.hpp>
#include <shardline/shm_transport.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "../support/shard_pattern.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <future>
#include <optional>
#include <string>
#include <vector>

namespace sl = shardline;
using sl::testing::fill;
using sl::testing::pattern;
using namespace std::chrono_literals;

namespace {

std::vector<sl::parameter_descriptor> model() {
  std::vector<sl::parameter_descriptor> t;
  for (int l = 0; l < 4; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "self_attn.q_proj.weight", sl::dtype::bf16, {256, 256}});
    t.push_back({p + "self_attn.k_proj.weight", sl::dtype::bf16, {64, 256}});
    t.push_back({p + "self_attn.v_proj.weight", sl::dtype::bf16, {64, 256}});
    t.push_back({p + "mlp.gate_proj.weight", sl::dtype::bf16, {512, 256}});
    t.push_back({p + "mlp.up_proj.weight", sl::dtype::bf16, {512, 256}});
  }
  return t;
}

sl::transfer_plan plan_of() {
  sl::plan_options o;
  o.bucket_bytes = 512 << 10;
  return sl::transfer_plan::build(model(), sl::shard_map::standard(), o);
}


std::string socket_path() {
  return "/tmp/shardline-test-pipeline-" + std::to_string(getpid()) + ".sock";
}

// The rollout process: exposes the plan's parameters, waits for one commit and checks
// every byte against the pattern. Exit status 0: verified; 3: a byte differs; 4: an error.
int rollout(const std::string& path) {
  try {
    const auto plan = plan_of();
    asio::io_context io;
    sl::shm_transport::receiver endpoint(io.get_executor(), path);
    sl::weights_receiver weights(endpoint, plan.receiver_parameters(0));
    std::optional<std::uint32_t> version;
    endpoint.async_accept([&](std::error_code ec) {
      if (ec) return;
      weights.async_wait_commit([&](std::error_code ec2, std::uint32_t v) {
        if (!ec2) version = v;
        io.stop();
      });
    });
    io.run();
    if (!version) return 4;
    for (const auto& p : plan.receiver_parameters(0)) {
      const auto* planned = plan.find(p.name);
      auto bytes = weights.parameter(p.name);
      for (const auto& s : planned->parameter.shards)
        for (std::size_t i = 0; i < s.tensor.bytes(); ++i)
          if (bytes[s.offset + i] != pattern(s.tensor.name, *version, i)) return 3;
    }
    return 0;
  } catch (...) {
    return 4;
  }
}

asio::awaitable<sl::shm_transport::connection> connect(sl::shm_transport& t, std::string path) {
  auto ex = co_await asio::this_coro::executor;
  for (int attempt = 0;; ++attempt) {
    auto [ec, c] = co_await t.async_connect(path, asio::experimental::as_tuple(asio::use_awaitable));
    if (!ec) co_return std::move(c);
    if (attempt > 200) throw sl::error(ec, "connect " + path);
    asio::steady_timer pause(ex, 20ms);
    co_await pause.async_wait(asio::use_awaitable);
  }
}

template <class Loader>
asio::awaitable<void> push(sl::shm_transport& t, std::string path, Loader loader,
                           std::uint32_t version) {
  auto conn = co_await connect(t, path);
  std::vector<sl::shm_transport::connection*> links{&conn};
  sl::update_pipeline<sl::shm_transport> pipeline(t, plan_of(), links);
  co_await pipeline.async_update(version, loader, asio::use_awaitable);
}

int wait_child(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

TEST_CASE("pipeline over shm: a receiver process gets every byte and the commit") {
  const std::string path = socket_path();
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) _exit(rollout(path));
  asio::io_context io;
  sl::shm_transport transport(io.get_executor());
  auto f = asio::co_spawn(io, push(transport, path, fill, 5), asio::use_future);
  io.run();
  CHECK_NOTHROW(f.get());
  CHECK(wait_child(child) == 0);
}

TEST_CASE("pipeline over shm: the receiver dies mid-update; the update fails, no hang") {
  const std::string path = socket_path();
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) _exit(rollout(path));
  asio::io_context io;
  sl::shm_transport transport(io.get_executor());
  int loads = 0;
  auto loader = [child, &loads](const sl::shard_load& load) {
    fill(load);
    if (++loads == 4) {
      kill(child, SIGKILL);
      waitpid(child, nullptr, 0);  // dead for sure before the next shard's write
    }
  };
  auto f = asio::co_spawn(io, push(transport, path, loader, 1), asio::use_future);
  io.run();  // returns: nothing hangs on the dead peer
  try {
    f.get();
    FAIL("an update to a dead receiver succeeded");
  } catch (const sl::error& e) {
    // Either a parameter's write or the commit meets the closed socket first; both name
    // the receiver, and either way nothing was committed.
    CHECK(e.code() == sl::errc::peer_disconnected);
    CHECK(std::string(e.what()).find("receiver 0") != std::string::npos);
  }
}
