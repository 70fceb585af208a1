// pipeline_overlap: the same weight update, done the old way (load a bucket, write it,
// wait, next bucket) and through shardline's pipeline, side by side in one run: over the
// loopback transport's CPU-free link model (the NIC case), and over the shm transport into
// a forked receiver process.
//
//   bench_pipeline_overlap [--model-bytes 256M] [--bucket-bytes 16M] [--repetitions 3] [--json]
//
// Both paths send the same acknowledged notices: begin, the writes, commit; the receiver is
// a weights_receiver in plan mode that awaits every commit.
//
// Results per scenario (NAME = pipeline_overlap, pipeline_overlap.shm), medians of
// `repetitions` rounds, each round running the sequential path and then the pipeline:
//  - NAME.speedup: pipelined makespan (the update_report's elapsed(): begin to the commit's
//    last acknowledgement) vs the sequential path's; ratio = sequential / pipelined.
//  - NAME.efficiency: pipelined makespan vs update_report::lower_bound(); ratio =
//    lower_bound / makespan, never above 1. The bound is max(load_busy, transfer_busy) of the
//    same run: the union of the buckets' load intervals (time at least one bucket was
//    loading) and the union of their transfer intervals (first write posted to last write
//    completed). No schedule of this run's loads and transfers can finish before the busier
//    of the two stages has been busy that long, and both unions lie inside the makespan. It
//    is a bound for this run's stage times: where overlapping slows each stage down (shm on
//    a 2-core host: loader and copy threads share the cores and the memory bus), the busy
//    times grow with it, and efficiency says how well the stages overlapped, not how fast
//    they could have been alone (the speedup says that).
#include "../examples/synthetic_model.hpp"
#include "../examples/synthetic_model.hpp"

#include <shardline/plan/convert.hpp>
#include <shardline/transport/loopback.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/transport/shm/transport.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <csignal>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
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

// What the old path spent: makespan, and per stage its sum over buckets.
struct sequential_result {
  clock_type::duration makespan{}, total_load{}, total_transfer{};
};

struct masters {
  std::map<std::string, std::vector<std::byte>> values;
  int passes = 1;
  void load(const sl::shard_load& load) const {
    const auto& v = values.at(load.tensor.name);
    for (int p = 0; p < passes; ++p) std::memcpy(load.staging.data(), v.data(), v.size());
  }
};

// The old path: begin, then one bucket at a time, its transfer started only after all of it
// loaded, the next bucket's load started only after its transfer completed; then commit.
template <class Connection, class Loader>
asio::awaitable<sequential_result> run_sequential(Connection& conn, const sl::transfer_plan& plan,
                                                  const Loader& load, std::span<std::byte> staging,
                                                  const sl::local_region& local, std::uint32_t version) {
  sequential_result r;
  const auto start = clock_type::now();
  co_await conn.async_notify(sl::notice_kind::begin, version, asio::use_awaitable);
  std::vector<sl::write_request> batch;
  for (const auto& b : plan.buckets()) {
    const auto load_start = clock_type::now();
    for (const auto& p : b.parameters)
      for (const auto& s : p.parameter.shards)
        load({s.tensor, p.parameter.destination, s.index,
              staging.subspan(p.staging_offset + s.offset, s.tensor.bytes()), sl::memory_location::host(),
              version});
    const auto load_end = clock_type::now();
    batch.clear();
    for (const auto& p : b.parameters)
      for (const auto& w : p.writes)
        batch.push_back(sl::make_write(local, staging.subspan(p.staging_offset + w.staging_offset, w.bytes),
                                       *conn.remote_regions().find(p.slice.name), w.destination_offset));
    co_await conn.async_write(batch, asio::use_awaitable);
    r.total_load += load_end - load_start;
    r.total_transfer += clock_type::now() - load_end;
  }
  co_await conn.async_notify(sl::notice_kind::commit, version, asio::use_awaitable);
  r.makespan = clock_type::now() - start;
  co_return r;
}

struct measured {
  std::vector<double> sequential, sequential_load, sequential_transfer;
  std::vector<double> pipelined, lower_bound, load_busy, transfer_busy;
  int passes = 1;
};

// The sequential and the pipelined path, alternating, `repetitions` times; versions from
// `version` on.
template <class Transport, class Loader>
asio::awaitable<measured> compare(Transport& transport, typename Transport::connection& conn,
                                  const sl::transfer_plan& plan, const Loader& load, int repetitions,
                                  std::uint32_t version) {
  std::vector<std::byte> staging_bytes(plan.max_staging_bytes());
  auto registration = transport.register_memory(staging_bytes);
  std::vector<typename Transport::connection*> links{&conn};
  sl::update_pipeline<Transport> pipeline(transport, plan, links);
  auto loader = [&load](const sl::shard_load& l) { load(l); };
  measured out;
  for (int rep = 0; rep < repetitions; ++rep) {
    const auto s = co_await run_sequential(conn, plan, load, staging_bytes, registration.region(), version++);
    const auto report = co_await pipeline.async_update(version++, loader, asio::use_awaitable);
    out.sequential.push_back(ms(s.makespan));
    out.sequential_load.push_back(ms(s.total_load));
    out.sequential_transfer.push_back(ms(s.total_transfer));
    out.pipelined.push_back(ms(report.elapsed()));
    out.lower_bound.push_back(ms(report.lower_bound()));
    out.load_busy.push_back(ms(report.load_busy()));
    out.transfer_busy.push_back(ms(report.transfer_busy()));
  }
  co_return out;
}

std::vector<float> master_f32(const sl::parameter_descriptor& t) {
  std::vector<float> v(t.elements());
  sl::examples::fill_master(t.name, 1, v);
  return v;
}

using loopback_weights = sl::weights_receiver<sl::loopback_transport::receiver>;

// Awaits every commit (or abandoned version) until the endpoint closes.
asio::awaitable<void> watch_commits(loopback_weights& w) {
  for (;;) {
    auto [ec, v] = co_await w.async_wait_commit(asio::experimental::as_tuple(asio::use_awaitable));
    if (ec && ec != sl::errc::version_abandoned) co_return;
  }
}

// Scenario "wire": the transfer costs time but no CPU, as a NIC's DMA engine: the loopback
// transport's serial link model, its rate set so that the link needs as long as the loads.
// The loader converts the trainer's float32 weights to bf16 (CPU-bound real work).
asio::awaitable<measured> wire_scenario(const sl::transfer_plan& plan, options o) {
  auto ex = co_await asio::this_coro::executor;
  sl::loopback_transport transport(ex);
  sl::loopback_transport::receiver endpoint(ex);
  loopback_weights weights(endpoint, plan, 0);
  asio::co_spawn(ex, watch_commits(weights), asio::detached);
  auto conn = transport.connect(endpoint, {0, plan.fingerprint()});
  std::map<std::string, std::vector<float>> f32;
  for (const auto& b : plan.buckets())
    for (const auto& p : b.parameters)
      for (const auto& s : p.parameter.shards) f32[s.tensor.name] = master_f32(s.tensor);
  auto convert = [&f32](const sl::shard_load& l) {
    sl::convert_f32_to_bf16(f32.at(l.tensor.name), l.staging);
  };
  std::vector<std::byte> staging(plan.max_staging_bytes());
  auto registration = transport.register_memory(staging);
  co_await run_sequential(conn, plan, convert, staging, registration.region(), 1);  // fault pages in
  auto probe = co_await run_sequential(conn, plan, convert, staging, registration.region(), 2);
  conn.set_wire_rate(plan.total_bytes() / std::chrono::duration<double>(probe.total_load).count());
  auto out = co_await compare(transport, conn, plan, convert, o.repetitions, 3);
  endpoint.close();  // ends the watcher
  co_return out;
}

// Scenario "shm": a real receiver process; the transfer is a memcpy on the transport's
// worker thread, so it competes with the loader for the 2 cores and the memory bus. The
// loader gathers bf16 shards (memcpy), `passes` times, calibrated to match the transfer.
asio::awaitable<measured> shm_scenario(sl::shm_transport& transport, const sl::transfer_plan& plan,
                                       std::string path, options o) {
  auto ex = co_await asio::this_coro::executor;
  std::optional<sl::shm_transport::connection> conn;
  for (int attempt = 0; !conn; ++attempt) {
    auto [ec, c] = co_await transport.async_connect(path, {0, plan.fingerprint()},
                                                    asio::experimental::as_tuple(asio::use_awaitable));
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
        v.resize(s.tensor.bytes());
        sl::convert_f32_to_bf16(master_f32(s.tensor), v);
      }
  std::vector<std::byte> staging(plan.max_staging_bytes());
  auto registration = transport.register_memory(staging);
  auto gather = [&m](const sl::shard_load& l) { m.load(l); };
  co_await run_sequential(*conn, plan, gather, staging, registration.region(), 1);
  auto probe = co_await run_sequential(*conn, plan, gather, staging, registration.region(), 2);
  m.passes = std::max(1, static_cast<int>(ms(probe.total_transfer) / ms(probe.total_load) + 0.5));
  auto out = co_await compare(transport, *conn, plan, gather, o.repetitions, 3);
  out.passes = m.passes;
  conn->close();
  co_return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The receiver process: accepts the trainer, then awaits commits until the parent ends it.
int receive(const sl::transfer_plan& plan, const std::string& path) {
  asio::io_context io;
  sl::shm_transport::receiver endpoint(io.get_executor(), path);
  sl::weights_receiver weights(endpoint, plan, 0);
  auto serve = [](sl::shm_transport::receiver& e,
                  sl::weights_receiver<sl::shm_transport::receiver>& w) -> asio::awaitable<void> {
    co_await e.async_accept(asio::use_awaitable);
    for (;;) {
      auto [ec, v] = co_await w.async_wait_commit(asio::experimental::as_tuple(asio::use_awaitable));
      if (ec && ec != sl::errc::version_abandoned) co_return;
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
    else if (a == "--model-bytes" && i + 1 < argc) o.model_bytes = sl::examples::parse_bytes(argv[++i]);
    else if (a == "--bucket-bytes" && i + 1 < argc) o.bucket_bytes = sl::examples::parse_bytes(argv[++i]);
    else if (a == "--repetitions" && i + 1 < argc) o.repetitions = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: bench_pipeline_overlap [--model-bytes N] [--bucket-bytes N] "
                           "[--repetitions N] [--json]\n");
      return 2;
    }
  }
  // Smaller tensors than the demo's default, so that buckets hold many parameters.
  sl::examples::model_config base;
  base.hidden = 1024;
  base.intermediate = 2816;
  base.kv_dim = 256;
  base.vocab = 8192;
  const auto model = sl::examples::model_config::of_size(o.model_bytes, 0, base);
  sl::plan_options po;
  po.bucket_bytes = o.bucket_bytes;
  const auto plan = sl::transfer_plan::build(model.tensors(), sl::shard_map::standard(), po);
  const std::string path = "/tmp/shardline-bench-overlap-" + std::to_string(getpid()) + ".sock";

  const pid_t child = fork();
  if (child == 0) _exit(receive(plan, path));

  measured wire, shm;
  try {
    asio::io_context io;
    auto w = asio::co_spawn(io, wire_scenario(plan, o), asio::use_future);
    io.run();
    wire = w.get();
    io.restart();
    sl::shm_options so;
    so.copy_threads = 1;  // 2 cores: one copies, one loads
    sl::shm_transport transport(io.get_executor(), so);
    auto f = asio::co_spawn(io, shm_scenario(transport, plan, path, o), asio::use_future);
    io.run();
    shm = f.get();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_pipeline_overlap: %s\n", e.what());
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
    ::unlink(path.c_str());
    return 1;
  }
  // A trainer leaving between versions is no error to the receiver: it would wait for the
  // next one. It has acknowledged every commit, so it can go now.
  kill(child, SIGTERM);
  waitpid(child, nullptr, 0);
  ::unlink(path.c_str());  // its socket file: a killed receiver does not remove it

  struct row {
    const char* name;
    const measured& m;
  };
  const row rows[] = {{"pipeline_overlap", wire}, {"pipeline_overlap.shm", shm}};
  if (!o.json) {
    std::printf("pipeline_overlap: %.0f MiB in %zu buckets of <= %.0f MiB, depth 2, median of %d\n",
                plan.total_bytes() / 1048576.0, plan.buckets().size(), o.bucket_bytes / 1048576.0,
                o.repetitions);
    std::printf("  pipeline_overlap:     loader converts f32 -> bf16; a CPU-free link modelled "
                "at the loads' rate (the NIC case)\n");
    std::printf("  pipeline_overlap.shm: loader gathers bf16 (memcpy x %d); shm memcpy into a "
                "receiver process (CPU and memory bus shared)\n", shm.passes);
    std::printf("  %-34s %10s %12s %8s  %s\n", "result", "value ms", "baseline ms", "ratio",
                "baseline");
  }
  for (const auto& r : rows) {
    const double seq = median(r.m.sequential), pipe = median(r.m.pipelined), bound = median(r.m.lower_bound);
    const std::string speedup = std::string(r.name) + ".speedup";
    const std::string efficiency = std::string(r.name) + ".efficiency";
    if (o.json) {
      std::printf("{\"name\":\"%s\",\"value\":%.3f,\"unit\":\"ms\",\"baseline\":%.3f,"
                  "\"ratio\":%.4f}\n", speedup.c_str(), pipe, seq, seq / pipe);
      std::printf("{\"name\":\"%s\",\"value\":%.3f,\"unit\":\"ms\",\"baseline\":%.3f,"
                  "\"ratio\":%.4f}\n", efficiency.c_str(), pipe, bound, bound / pipe);
      continue;
    }
    std::printf("  %-34s %10.1f %12.1f %8.3f  sequential (sum load %.1f, sum transfer %.1f)\n",
                speedup.c_str(), pipe, seq, seq / pipe, median(r.m.sequential_load),
                median(r.m.sequential_transfer));
    std::printf("  %-34s %10.1f %12.1f %8.3f  lower_bound = max(load busy %.1f, transfer busy %.1f)\n",
                efficiency.c_str(), pipe, bound, bound / pipe, median(r.m.load_busy), median(r.m.transfer_busy));
  }
  return 0;
}
