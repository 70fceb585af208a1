#include <shardline/pipeline.hpp>

#include <shardline/plan/shard_map.hpp>
#include <shardline/transport/shm/transport.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
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

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <vector>

namespace sl = shardline;
using sl::testing::fill;
using namespace std::chrono_literals;

namespace {

std::vector<sl::parameter_descriptor> model() {
  std::vector<sl::parameter_descriptor> t;
  for (int l = 0; l < 4; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", sl::dtype::bf16, {256}});
    t.push_back({p + "self_attn.q_proj.weight", sl::dtype::bf16, {256, 256}});
    t.push_back({p + "self_attn.k_proj.weight", sl::dtype::bf16, {64, 256}});
    t.push_back({p + "self_attn.v_proj.weight", sl::dtype::bf16, {64, 256}});
    t.push_back({p + "self_attn.o_proj.weight", sl::dtype::bf16, {256, 256}});
    t.push_back({p + "mlp.gate_proj.weight", sl::dtype::bf16, {512, 256}});
    t.push_back({p + "mlp.up_proj.weight", sl::dtype::bf16, {512, 256}});
  }
  return t;
}

// q, k and v of each layer on three different senders (of `senders`), the rest on a fourth.
sl::transfer_plan plan_of(std::size_t tp = 1, std::size_t senders = 1) {
  sl::plan_options o;
  o.bucket_bytes = 256 << 10;
  o.tensor_parallel = tp;
  o.senders = senders;
  if (senders > 1)
    o.sender_of = [senders](const sl::parameter_descriptor& t) -> std::size_t {
      const std::size_t layer = static_cast<std::size_t>(t.name[13] - '0');
      std::size_t shift = 3;
      if (t.name.find("q_proj") != std::string::npos) shift = 0;
      if (t.name.find("k_proj") != std::string::npos) shift = 1;
      if (t.name.find("v_proj") != std::string::npos) shift = 2;
      return (layer + shift) % senders;
    };
  return sl::transfer_plan::build(model(), sl::shard_map::standard(), o);
}

// Named after the test process, not the caller: children compute the same paths.
const pid_t test_process = getpid();

std::string socket_path(int r = 0) {
  return "/tmp/shardline-test-pipeline-" + std::to_string(test_process) + "-" + std::to_string(r) + ".sock";
}

// Exit statuses of a rollout process.
enum rollout_status { verified = 0, wrong_bytes = 3, failed = 4, wrong_sequence = 5 };

bool holds(const sl::transfer_plan& plan, std::size_t r,
           const sl::weights_receiver<sl::shm_transport::receiver>& weights, std::uint32_t version) {
  for (const auto& p : weights.parameters()) {
    const auto want = sl::testing::expected_bytes(plan, r, p, version);
    if (std::memcmp(weights.parameter(p.name).data(), want.data(), want.size()) != 0) return false;
  }
  return true;
}

asio::awaitable<void> accept_forever(sl::shm_transport::receiver& endpoint) {
  while (true) {
    auto [ec, sender] = co_await endpoint.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
    (void)sender;
    if (ec == asio::error::operation_aborted || ec == sl::errc::not_connected) co_return;
  }
}

// Receiver `r` of `plan` in a process of its own: accepts senders as long as it lives and
// checks, outcome by outcome, that async_wait_commit reports `script` (a committed version
// whose every byte is verified, or a version abandoned with a reason naming
// `abandoned_by`). Exit status: rollout_status.
struct outcome {
  bool committed;
  std::uint32_t version;
};

int rollout(const sl::transfer_plan& plan, std::size_t r, const std::string& path,
            std::vector<outcome> script, int abandoned_by = -1) {
  try {
    asio::io_context io;
    sl::shm_transport::receiver endpoint(io.get_executor(), path);
    sl::weights_receiver<sl::shm_transport::receiver> weights(endpoint, plan, r);
    asio::co_spawn(io, accept_forever(endpoint), asio::detached);
    int status = verified;
    std::size_t step = 0;
    std::function<void()> next = [&] {
      weights.async_wait_commit([&](std::error_code ec, std::uint32_t v) {
        const outcome want = script[step];
        if (ec && ec != sl::errc::version_abandoned) status = failed;
        else if (!ec != want.committed || v != want.version) status = wrong_sequence;
        else if (!ec && !holds(plan, r, weights, v)) status = wrong_bytes;
        else if (ec && abandoned_by >= 0 &&
                 weights.state().reason.find("sender " + std::to_string(abandoned_by)) == std::string::npos)
          status = wrong_sequence;
        if (status != verified || ++step == script.size()) {
          endpoint.close();
          io.stop();
          return;
        }
        next();
      });
    };
    next();
    io.run();
    return status;
  } catch (...) {
    return failed;
  }
}

asio::awaitable<sl::shm_transport::connection> connect(sl::shm_transport& t, std::string path,
                                                       sl::sender_identity who) {
  auto ex = co_await asio::this_coro::executor;
  for (int attempt = 0;; ++attempt) {
    auto [ec, c] = co_await t.async_connect(path, who, asio::experimental::as_tuple(asio::use_awaitable));
    if (!ec) co_return std::move(c);
    if (attempt > 250) throw sl::error(ec, "connect " + path);
    asio::steady_timer pause(ex, 20ms);
    co_await pause.async_wait(asio::use_awaitable);
  }
}

// One trainer rank: connects to every receiver and pushes `versions`, one after the other.
template <class Loader>
asio::awaitable<void> push(sl::shm_transport& t, sl::transfer_plan plan, std::size_t sender,
                           Loader loader, std::vector<std::uint32_t> versions) {
  std::vector<sl::shm_transport::connection> conns;
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    conns.push_back(co_await connect(t, socket_path(static_cast<int>(r)),
                                     {static_cast<std::uint32_t>(sender), plan.fingerprint()}));
  std::vector<sl::shm_transport::connection*> links;
  for (auto& c : conns) links.push_back(&c);
  sl::update_pipeline<sl::shm_transport> pipeline(t, plan.senders() > 1 ? plan.for_sender(sender) : plan, links);
  std::exception_ptr first;
  for (auto v : versions) {
    try {
      co_await pipeline.async_update(v, loader, asio::use_awaitable);
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

// Children not yet waited for: a test that fails early kills them rather than leave them
// listening forever.
std::vector<pid_t> running_children;

struct reap_children {
  ~reap_children() {
    for (pid_t c : running_children) {
      kill(c, SIGKILL);
      waitpid(c, nullptr, 0);
    }
    running_children.clear();
  }
};

int wait_child(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  running_children.erase(std::remove(running_children.begin(), running_children.end(), pid), running_children.end());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

pid_t spawn(std::function<int()> body) {
  const pid_t child = fork();
  if (child == 0) _exit(body());
  running_children.push_back(child);
  return child;
}

// A trainer rank in a process of its own. Exit status 0: every version pushed; 1: failed.
pid_t spawn_sender(const sl::transfer_plan& plan, std::size_t sender, std::vector<std::uint32_t> versions,
                   int kill_after_loads = 0) {
  return spawn([&plan, sender, versions, kill_after_loads] {
    asio::io_context io;
    sl::shm_transport transport(io.get_executor());
    int loads = 0;
    auto loader = [&loads, kill_after_loads](const sl::shard_load& load) {
      fill(load);
      if (++loads == kill_after_loads) raise(SIGKILL);  // the rank dies mid-update
    };
    auto f = asio::co_spawn(io, push(transport, plan, sender, loader, versions), asio::use_future);
    io.run();
    try {
      f.get();
      return 0;
    } catch (...) {
      return 1;
    }
  });
}

}  // namespace

TEST_CASE("pipeline over shm: a receiver process gets every byte and the commit") {
  reap_children reaper;
  const auto plan = plan_of();
  const pid_t child = spawn([&] { return rollout(plan, 0, socket_path(0), {{true, 5}}); });
  REQUIRE(child > 0);
  asio::io_context io;
  sl::shm_transport transport(io.get_executor());
  auto f = asio::co_spawn(io, push(transport, plan, 0, fill, {5}), asio::use_future);
  io.run();
  CHECK_NOTHROW(f.get());
  CHECK(wait_child(child) == verified);
}

TEST_CASE("pipeline over shm: a failed update leaves the connection whole; the next version lands") {
  reap_children reaper;
  const auto plan = plan_of();
  const pid_t child = spawn([&] { return rollout(plan, 0, socket_path(0), {{false, 1}, {true, 2}}); });
  REQUIRE(child > 0);
  asio::io_context io;
  sl::shm_transport transport(io.get_executor());
  auto loader = [](const sl::shard_load& load) {
    if (load.version == 1 && load.tensor.name == "model.layers.2.self_attn.k_proj.weight")
      throw std::runtime_error("bad checkpoint shard");
    fill(load);
  };
  auto f = asio::co_spawn(io, push(transport, plan, 0, loader, {1, 2}), asio::use_future);
  io.run();
  try {
    f.get();
    FAIL("version 1 did not fail");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::loader_failed);
    CHECK(std::string(e.what()).find("bad checkpoint shard") != std::string::npos);
  }
  CHECK(wait_child(child) == verified);  // version 1 abandoned, version 2 verified byte for byte
}

TEST_CASE("pipeline over shm: the receiver dies mid-update; the update fails, no hang") {
  reap_children reaper;
  const auto plan = plan_of();
  const pid_t child = spawn([&] { return rollout(plan, 0, socket_path(0), {{true, 1}}); });
  REQUIRE(child > 0);
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
  auto f = asio::co_spawn(io, push(transport, plan, 0, loader, {1}), asio::use_future);
  io.run();  // returns: nothing hangs on the dead peer
  try {
    f.get();
    FAIL("an update to a dead receiver succeeded");
  } catch (const sl::error& e) {
    // A parameter's write or the commit meets the closed socket first; both name the
    // receiver, and either way nothing was committed.
    CHECK(e.code() == sl::errc::peer_disconnected);
    CHECK(std::string(e.what()).find("receiver 0") != std::string::npos);
  }
}

TEST_CASE("pipeline over shm: 4 sender processes x 2 receiver processes; a sender killed mid-update and restarted") {
  reap_children reaper;
  // Tensor parallel 2; q, k and v of each layer held by different trainer ranks, each writing
  // its shards straight into the fused qkv_proj of both receivers.
  const auto plan = plan_of(2, 4);
  // Version 1 commits; version 2 loses sender 1 mid-update and is never announced; the
  // restarted sender 1 and the others push version 3, which commits.
  const std::vector<outcome> script{{true, 1}, {false, 2}, {true, 3}};
  std::vector<pid_t> receivers;
  for (int r = 0; r < 2; ++r)
    receivers.push_back(spawn([&plan, r, &script] { return rollout(plan, static_cast<std::size_t>(r), socket_path(r), script, 1); }));
  const auto round = [&plan](std::uint32_t version, int kill_sender_after) {
    std::vector<pid_t> senders;
    for (std::size_t s = 0; s < 4; ++s)
      senders.push_back(spawn_sender(plan, s, {version}, s == 1 ? kill_sender_after : 0));
    std::vector<int> status;
    for (auto pid : senders) status.push_back(wait_child(pid));
    return status;
  };
  CHECK(round(1, 0) == std::vector<int>{0, 0, 0, 0});
  const auto second = round(2, 3);
  CHECK(second[1] == 128 + SIGKILL);
  CHECK(round(3, 0) == std::vector<int>{0, 0, 0, 0});
  for (int r = 0; r < 2; ++r) {
    INFO("receiver " << r << " (3: a byte differs, 4: an error, 5: wrong commit sequence)");
    CHECK(wait_child(receivers[static_cast<std::size_t>(r)]) == verified);
  }
}
