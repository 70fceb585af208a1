// pipeline_overlap: the same weight update, done the old way (load a bucket, write it,
// wait, next bucket) and through shardline's pipeline, side by side in one run, over the
// shm transport into a forked receiver process.
//
//   bench_pipeline_overlap [--model-bytes 256M] [--bucket-bytes 16M] [--repetitions 3] [--json]
//
// The loader does real work (float32 -> bf16 conversion of the trainer's master weights,
// repeated `passes` times); passes is calibrated so that loading a bucket takes about as
// long as transferring it, the case where overlap matters most.
#include "../examples/synthetic_model.hpp"

#include <shardline/convert.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/shard_map.hpp>
#include <shardline/shm_transport.hpp>
#include <shardline/transfer_plan.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace sl = shardline;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

struct options {
  std::uint64_t model_bytes = 256ull << 20;
  std::uint64_t bucket_bytes = 16ull << 20;
  int repetitions = 3;
  bool json = false;
};

double ms(clock_type::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

std::uint64_t parse_bytes(const std::string& s) {
  std::size_t used = 0;
  const double v = std::stod(s, &used);
  const char unit = used < s.size() ? s[used] : 0;
  return static_cast<std::uint64_t>(v * (unit == 'G' ? 1 << 30 : unit == 'M' ? 1 << 20
                                        : unit == 'K' ? 1 << 10 : 1));
}

// Every result line of the old path: how long each bucket took to load and to transfer.
struct sequential_result {
  clock_type::duration makespan{}, first_load{}, total_load{}, total_transfer{};
};

struct masters {
  std::map<std::string, std::vector<float>> values;
  int passes = 1;
  void load(const sl::shard_load& load) const {
    const auto& v = values.at(load.tensor.name);
    for (int p = 0; p < passes; ++p) sl::convert_f32_to_bf16(v, load.staging);
  }
};

// The old path: one bucket at a time, its transfer started only after all of it loaded,
// the next bucket's load started only after its transfer completed.
asio::awaitable<sequential_result> run_sequential(sl::shm_transport& transport,
                                                  sl::shm_transport::connection& conn,
                                                  const sl::transfer_plan& plan,
                                                  const masters& m, std::span<std::byte> staging,
                                                  const sl::local_region& local) {
  sequential_result r;
  const auto start = clock_type::now();
  for (const auto& b : plan.buckets()) {
    const auto load_start = clock_type::now();
    for (const auto& p : b.parameters)
      for (const auto& s : p.parameter.shards)
        m.load({s.tensor, p.parameter.destination, s.index,
                staging.subspan(p.staging_offset + s.offset, s.tensor.bytes()), 1});
    const auto load_end = clock_type::now();
    std::vector<sl::write_request> batch;
    for (const auto& p : b.parameters)
      for (const auto& w : p.writes)
        batch.push_back(sl::make_write(local, staging.subspan(p.staging_offset + w.staging_offset, w.bytes),
                                       *conn.remote_regions().find(p.parameter.destination.name),
                                       w.destination_offset));
    co_await conn.async_write(batch, asio::use_awaitable);
    const auto transfer_end = clock_type::now();
    if (&b == &plan.buckets().front()) r.first_load = load_end - load_start;
    r.total_load += load_end - load_start;
    r.total_transfer += transfer_end - load_end;
  }
  co_await conn.async_write_notify({}, 1, asio::use_awaitable);
  r.makespan = clock_type::now() - start;
  (void)transport;
  co_return r;
}

struct measured {
  std::vector<double> sequential, pipelined, ideal, load, transfer;
};

asio::awaitable<measured> bench(sl::shm_transport& transport, const sl::transfer_plan& plan,
                                std::string path, options o) {
  auto ex = co_await asio::this_coro::executor;
  std::optional<sl::shm_transport::connection> conn;
  for (int attempt = 0; !conn; ++attempt) {
    auto [ec, c] = co_await transport.async_connect(path, asio::experimental::as_tuple(asio::use_awaitable));
    if (!ec) conn.emplace(std::move(c));
    else if (attempt > 200) throw sl::error(ec, "connect to the receiver at " + path);
    else {
      asio::steady_timer pause(ex, 50ms);
      co_await pause.async_wait(asio::use_awaitable);
    }
  }

  masters m;
  for (const auto& b : plan.buckets())
    for (const auto& p : b.parameters)
      for (const auto& s : p.parameter.shards) {
        auto& v = m.values[s.tensor.name];
        v.resize(s.tensor.elements());
        sl::examples::fill_master(s.tensor.name, 1, v);
      }
  std::vector<std::byte> staging_bytes(plan.max_staging_bytes());
  auto registration = transport.register_memory(staging_bytes);

  // Calibrate: passes so that loading takes about as long as transferring.
  auto probe = co_await run_sequential(transport, *conn, plan, m, staging_bytes, registration.region());
  m.passes = std::max(1, static_cast<int>(ms(probe.total_transfer) / ms(probe.total_load) + 0.5));

  std::vector<sl::update_pipeline<sl::shm_transport>::connection_type*> links{&*conn};
  sl::update_pipeline<sl::shm_transport> pipeline(transport, plan, links);
  auto loader = [&m](const sl::shard_load& load) { m.load(load); };
  measured out;
  for (int rep = 0; rep < o.repetitions; ++rep) {
    auto s = co_await run_sequential(transport, *conn, plan, m, staging_bytes, registration.region());
    const auto start = clock_type::now();
    co_await pipeline.async_update(rep + 2, loader, asio::use_awaitable);
    out.pipelined.push_back(ms(clock_type::now() - start));
    out.sequential.push_back(ms(s.makespan));
    out.ideal.push_back(std::max(ms(s.total_load), ms(s.total_transfer)) + ms(s.first_load));
    out.load.push_back(ms(s.total_load));
    out.transfer.push_back(ms(s.total_transfer));
  }
  conn->close();
  co_return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int receive(const sl::transfer_plan& plan, const std::string& path) {
  asio::io_context io;
  sl::shm_transport::receiver endpoint(io.get_executor(), path);
  sl::weights_receiver weights(endpoint, plan.receiver_parameters(0));
  auto serve = [](sl::shm_transport::receiver& e,
                  sl::weights_receiver<sl::shm_transport::receiver>& w) -> asio::awaitable<void> {
    co_await e.async_accept(asio::use_awaitable);
    for (;;) {
      auto [ec, v] = co_await w.async_wait_commit(asio::experimental::as_tuple(asio::use_awaitable));
      if (ec) co_return;  // the trainer closed: done
    }
  };
  asio::co_spawn(io, serve(endpoint, weights), asio::detached);
  io.run();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") o.json = true;
    else if (a == "--model-bytes" && i + 1 < argc) o.model_bytes = parse_bytes(argv[++i]);
    else if (a == "--bucket-bytes" && i + 1 < argc) o.bucket_bytes = parse_bytes(argv[++i]);
    else if (a == "--repetitions" && i + 1 < argc) o.repetitions = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: bench_pipeline_overlap [--model-bytes N] [--bucket-bytes N] "
                           "[--repetitions N] [--json]\n");
      return 2;
    }
  }
  const auto model = sl::examples::model_config::of_size(o.model_bytes);
  sl::plan_options po;
  po.bucket_bytes = o.bucket_bytes;
  const auto plan = sl::transfer_plan::build(model.tensors(), sl::shard_map::standard(), po);
  const std::string path = "/tmp/shardline-bench-overlap-" + std::to_string(getpid()) + ".sock";

  const pid_t child = fork();
  if (child == 0) _exit(receive(plan, path));

  measured m;
  try {
    asio::io_context io;
    sl::shm_options so;
    so.copy_threads = 1;  // 2 cores: one copies, one loads
    sl::shm_transport transport(io.get_executor(), so);
    auto f = asio::co_spawn(io, bench(transport, plan, path, o), asio::use_future);
    io.run();
    m = f.get();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_pipeline_overlap: %s\n", e.what());
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
    return 1;
  }
  waitpid(child, nullptr, 0);

  const double seq = median(m.sequential), pipe = median(m.pipelined), ideal = median(m.ideal);
  if (o.json) {
    std::printf("{\"name\":\"pipeline_overlap.speedup\",\"value\":%.3f,\"unit\":\"ms\","
                "\"baseline\":%.3f,\"ratio\":%.4f}\n", pipe, seq, seq / pipe);
    std::printf("{\"name\":\"pipeline_overlap.efficiency\",\"value\":%.3f,\"unit\":\"ms\","
                "\"baseline\":%.3f,\"ratio\":%.4f}\n", pipe, ideal, ideal / pipe);
    return 0;
  }
  std::printf("pipeline_overlap: %.0f MiB in %zu buckets over shm to a receiver process, "
              "median of %d\n", plan.total_bytes() / 1048576.0, plan.buckets().size(), o.repetitions);
  std::printf("  sum load %.1f ms, sum transfer %.1f ms (sequential run)\n", median(m.load),
              median(m.transfer));
  std::printf("  %-30s %12s %12s %8s\n", "result", "value ms", "baseline ms", "ratio");
  std::printf("  %-30s %12.1f %12.1f %8.3f  (baseline: sequential)\n", "pipeline_overlap.speedup",
              pipe, seq, seq / pipe);
  std::printf("  %-30s %12.1f %12.1f %8.3f  (baseline: ideal)\n", "pipeline_overlap.efficiency",
              pipe, ideal, ideal / pipe);
  return 0;
}
