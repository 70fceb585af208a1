// many_params: what a parameter costs the whole pipeline. The same bytes go over loopback
// as many small parameters and as 20 large ones, side by side in one run; the ratio is the
// per-parameter cost, since the bytes (memset by the loader, memcpy by the transport) are
// the same on both sides.
//
//   bench_many_params [--updates N] [--warmup N] [--builds N] [--bucket-bytes 16M]
//                     [--loader-threads N] [--json]
//
// Results (one JSON object per line with --json):
//  - many_params.20k: 20,000 source tensors of 4 KiB vs 20 of 4,000 KiB (78.1 MiB each
//    side), ms per update, median of `updates` steady-state updates after `warmup`.
//  - many_params.100k: 100,000 of 1 KiB vs 20 of 5,000 KiB (97.7 MiB each side), the same.
//  - many_params.build_100k: ms to build the plan (transfer_plan::build with
//    shard_map::standard()), the receiver (weights_receiver in plan mode, which lays out and
//    exposes every parameter), the loopback connection and the pipeline for the 100k model,
//    vs the same for its 20-tensor twin; median of `builds`.
//
// Shapes (bf16; S = the tensor's elements, 2048 for 4 KiB, 512 for 1 KiB; a 2-D tensor is
// [S/128, 128]). The many-parameter model is a small-expert MoE in Hugging Face naming, so the
// standard map's rules run on every name: model.embed_tokens.weight, then per layer L
//   model.layers.L.input_layernorm.weight, .post_attention_layernorm.weight   [S]
//   model.layers.L.self_attn.{q,k,v}_proj.weight    -> self_attn.qkv_proj.weight  [3S/128, 128]
//   model.layers.L.self_attn.o_proj.weight                                         [S/128, 128]
//   model.layers.L.mlp.experts.E.{gate,up}_proj.weight, E < 8 -> mlp.experts.w13_weight
//                                                                        [8, 2S/128, 128]
//   model.layers.L.mlp.experts.E.down_proj.weight              -> mlp.experts.w2_weight
//   model.layers.L.mlp.shared_expert.{gate,up}_proj.weight -> .shared_expert.gate_up_proj.weight
//   model.layers.L.mlp.shared_expert.down_proj.weight
// (33 source tensors, 8 destination parameters per layer), then model.extra.K.weight [S] up
// to the count, and model.norm.weight. The 20-tensor twin: model.layers.L.self_attn.o_proj
// and model.layers.L.mlp.down_proj, L < 10, [2000, 1024] (4,000 KiB) or [2500, 1024]
// (5,000 KiB), unfused (20 destinations).
//
// Method: one io_context on this thread, one loopback receiver (weights_receiver in plan
// mode, its commit awaited by a watcher coroutine), default pipeline (depth 2, one loader
// thread), 16 MiB buckets on both sides. The loader memsets each shard with a byte derived
// from the version and the tensor's name. After the timed updates the receiver's bytes are
// checked against the plan (a checksum per side); any difference exits non-zero. Without
// --json the table adds, per side, the process CPU time per update (both threads; steadier
// than wall time on a shared machine), the report's load and transfer busy times, the
// loader alone over every shard in one thread, and the build's parts.
#include "../examples/synthetic_model.hpp"

#include <shardline/transport/loopback.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace sl = shardline;
using clock_type = std::chrono::steady_clock;

namespace {

struct options {
  int updates = 5;
  int warmup = 2;
  int builds = 3;
  std::uint64_t bucket_bytes = 16ull << 20;
  std::size_t loader_threads = 1;
  bool json = false;
};

double ms(clock_type::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// CPU time of the whole process (io thread, loader thread and all), in ms: less sensitive
// than wall time to other work on a shared machine.
double process_cpu_ms() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

sl::parameter_descriptor tensor(std::string name, std::vector<std::int64_t> shape) {
  return {std::move(name), sl::dtype::bf16, std::move(shape)};
}

// `count` source tensors of `bytes` each, as described in the header.
std::vector<sl::parameter_descriptor> many_model(std::size_t count, std::uint64_t bytes) {
  constexpr int experts = 8;
  constexpr std::size_t per_layer = 2 + 4 + 3 * experts + 3;
  const auto elements = static_cast<std::int64_t>(bytes / 2);
  const std::vector<std::int64_t> flat{elements}, matrix{elements / 128, 128};
  std::vector<sl::parameter_descriptor> t;
  t.reserve(count);
  t.push_back(tensor("model.embed_tokens.weight", matrix));
  const std::size_t layers = (count - 2) / per_layer;
  for (std::size_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back(tensor(p + "input_layernorm.weight", flat));
    for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj"})
      t.push_back(tensor(p + "self_attn." + m + ".weight", matrix));
    t.push_back(tensor(p + "post_attention_layernorm.weight", flat));
    for (int e = 0; e < experts; ++e)
      for (const char* m : {"gate_proj", "up_proj", "down_proj"})
        t.push_back(tensor(p + "mlp.experts." + std::to_string(e) + "." + m + ".weight", matrix));
    for (const char* m : {"gate_proj", "up_proj", "down_proj"})
      t.push_back(tensor(p + "mlp.shared_expert." + m + ".weight", matrix));
  }
  for (std::size_t k = 0; t.size() + 1 < count; ++k)
    t.push_back(tensor("model.extra." + std::to_string(k) + ".weight", flat));
  t.push_back(tensor("model.norm.weight", flat));
  return t;
}

// 20 unfused tensors of `bytes` each (a multiple of 2048).
std::vector<sl::parameter_descriptor> few_model(std::uint64_t bytes) {
  const std::vector<std::int64_t> shape{static_cast<std::int64_t>(bytes / 2 / 1024), 1024};
  std::vector<sl::parameter_descriptor> t;
  for (int l = 0; l < 10; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back(tensor(p + "self_attn.o_proj.weight", shape));
    t.push_back(tensor(p + "mlp.down_proj.weight", shape));
  }
  return t;
}

// The loader's byte for a tensor in a version: cheap, and different per tensor.
std::byte fill_byte(std::uint32_t version, std::string_view tensor) {
  return static_cast<std::byte>((std::hash<std::string_view>{}(tensor) >> 7) + version * 37);
}

struct fill_loader {
  void operator()(const sl::shard_load& l) const {
    std::memset(l.staging.data(), std::to_integer<int>(fill_byte(l.version, l.tensor.name)), l.staging.size());
  }
};

using receiver_type = sl::loopback_transport::receiver;
using pipeline_type = sl::update_pipeline<sl::loopback_transport>;

// Everything one side builds before its first update.
struct rig {
  explicit rig(asio::io_context& io) : transport(io.get_executor()), endpoint(io.get_executor()) {}
  sl::loopback_transport transport;
  receiver_type endpoint;
  std::optional<sl::weights_receiver<receiver_type>> weights;
  std::optional<sl::loopback_transport::connection> connection;
  std::optional<pipeline_type> pipeline;
};

struct build_times {
  double plan = 0, receiver = 0, connect = 0, pipeline = 0;
  double total() const { return plan + receiver + connect + pipeline; }
};

// Builds the plan, the receiver, the connection and the pipeline, timing each part.
std::unique_ptr<rig> build(asio::io_context& io, const std::vector<sl::parameter_descriptor>& tensors,
                           const options& o, build_times& times) {
  sl::plan_options po;
  po.bucket_bytes = o.bucket_bytes;
  sl::pipeline_options pipe;
  pipe.loader_threads = o.loader_threads;
  auto r = std::make_unique<rig>(io);
  auto t0 = clock_type::now();
  auto plan = sl::transfer_plan::build(tensors, sl::shard_map::standard(), po);
  auto t1 = clock_type::now();
  r->weights.emplace(r->endpoint, plan, 0);
  auto t2 = clock_type::now();
  r->connection.emplace(r->transport.connect(r->endpoint, {0, plan.fingerprint()}));
  auto t3 = clock_type::now();
  // The plan is moved in: a copy would add its own per-parameter allocations (measured apart).
  r->pipeline.emplace(r->transport, std::move(plan), std::vector{&*r->connection}, pipe);
  auto t4 = clock_type::now();
  times = {ms(t1 - t0), ms(t2 - t1), ms(t3 - t2), ms(t4 - t3)};
  return r;
}

// A checksum of what the receiver holds, and one of what it must hold for `version`,
// derived from the plan alone (full plan, one receiver: the parameter is its fused image).
std::pair<std::uint64_t, std::uint64_t> checksums(const rig& r, std::uint32_t version) {
  std::uint64_t got = 0, want = 0;
  std::vector<std::byte> expected;
  for (const auto& b : r.pipeline->plan().buckets())
    for (const auto& p : b.parameters) {
      const auto held = r.weights->parameter(p.slice.name);
      expected.assign(p.parameter.destination.bytes(), std::byte{0});
      for (const auto& s : p.parameter.shards)
        std::memset(expected.data() + s.offset, std::to_integer<int>(fill_byte(version, s.tensor.name)),
                    s.tensor.bytes());
      got = got * 31 + sl::examples::checksum(held);
      want = want * 31 + sl::examples::checksum(expected);
    }
  return {got, want};
}

struct side {
  std::string label;
  std::size_t tensors = 0, parameters = 0, buckets = 0;
  std::uint64_t bytes = 0;
  build_times built;           // median total of the builds, with that build's parts
  std::vector<double> update;  // ms per steady-state update
  std::vector<double> cpu;     // process CPU ms per steady-state update
  double loader_alone = 0;     // ms for one pass of the loader over every shard, in one thread
  double load_busy = 0, transfer_busy = 0;  // of the median update, from its report
  bool verified = false;
};

asio::awaitable<void> watch_commits(sl::weights_receiver<receiver_type>& w, std::uint32_t& last) {
  for (;;) {
    auto [ec, v] = co_await w.async_wait_commit(asio::experimental::as_tuple(asio::use_awaitable));
    if (ec == sl::errc::version_abandoned) continue;
    if (ec) co_return;  // the endpoint closed
    last = v;
  }
}

// Runs `count` updates, then waits until the receiver has announced the last one and
// closes it (which ends the watcher).
asio::awaitable<std::vector<sl::update_report>> run_updates(rig& r, int count, const std::uint32_t& last,
                                                            std::vector<double>& times, std::vector<double>& cpu) {
  std::vector<sl::update_report> reports;
  for (int i = 0; i < count; ++i) {
    const auto start = clock_type::now();
    const double cpu_start = process_cpu_ms();
    reports.push_back(co_await r.pipeline->async_update(static_cast<std::uint32_t>(i + 1), fill_loader{},
                                                        asio::use_awaitable));
    times.push_back(ms(clock_type::now() - start));
    cpu.push_back(process_cpu_ms() - cpu_start);
  }
  while (last != static_cast<std::uint32_t>(count)) co_await asio::post(asio::use_awaitable);
  r.endpoint.close();
  co_return reports;
}

side measure(const std::string& label, const std::vector<sl::parameter_descriptor>& tensors, const options& o) {
  side s;
  s.label = label;
  s.tensors = tensors.size();
  asio::io_context io;
  std::unique_ptr<rig> r;
  std::vector<build_times> builds;
  for (int b = 0; b < o.builds; ++b) {
    r.reset();  // the previous one goes before the next is built: same memory pressure
    build_times t;
    r = build(io, tensors, o, t);
    builds.push_back(t);
  }
  std::sort(builds.begin(), builds.end(), [](const auto& a, const auto& b) { return a.total() < b.total(); });
  s.built = builds[builds.size() / 2];
  const auto& plan = r->pipeline->plan();
  s.parameters = plan.parameter_count();
  s.buckets = plan.buckets().size();
  s.bytes = plan.total_bytes();

  {  // The loader alone, serially, into one slot: the floor of the load stage (a pass to
     // fault the slot in, then the median of 3).
    std::vector<std::byte> staging(plan.max_staging_bytes());
    std::vector<double> passes;
    for (int pass = 0; pass < 4; ++pass) {
      const auto start = clock_type::now();
      for (const auto& b : plan.buckets())
        for (const auto& p : b.parameters)
          for (const auto& sh : p.parameter.shards)
            fill_loader{}({sh.tensor, p.parameter.destination, sh.index,
                           std::span(staging).subspan(p.staging_offset + sh.offset, sh.tensor.bytes()),
                           sl::memory_location::host(), 1});
      if (pass > 0) passes.push_back(ms(clock_type::now() - start));
    }
    s.loader_alone = median(passes);
  }

  std::uint32_t last = 0;
  std::vector<double> all, cpu;
  asio::co_spawn(io, watch_commits(*r->weights, last), asio::detached);
  auto f = asio::co_spawn(io, run_updates(*r, o.warmup + o.updates, last, all, cpu), asio::use_future);
  io.run();
  const auto reports = f.get();
  s.update.assign(all.begin() + o.warmup, all.end());
  s.cpu.assign(cpu.begin() + o.warmup, cpu.end());
  // The report of the median steady-state update.
  std::vector<std::size_t> order(s.update.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&s](auto a, auto b) { return s.update[a] < s.update[b]; });
  const auto& mid = reports[static_cast<std::size_t>(o.warmup) + order[order.size() / 2]];
  s.load_busy = ms(mid.load_busy());
  s.transfer_busy = ms(mid.transfer_busy());
  bool wired = true;
  for (const auto& rep : reports) wired = wired && rep.wire_bytes == s.bytes;
  const auto [got, want] = checksums(*r, last);
  s.verified = wired && got == want && last == static_cast<std::uint32_t>(o.warmup + o.updates);
  if (!s.verified)
    std::fprintf(stderr, "bench_many_params: %s: receiver checksum %016llx, expected %016llx (version %u)%s\n",
                 label.c_str(), static_cast<unsigned long long>(got), static_cast<unsigned long long>(want), last,
                 wired ? "" : "; an update wrote fewer bytes than the plan");
  return s;
}

void print_side(const side& s) {
  std::printf("  %-13s %6zu tensors -> %5zu parameters in %zu buckets, %5.1f MiB: update %7.2f ms, "
              "cpu %7.2f ms (load busy %6.2f, transfer busy %6.2f; loader alone %6.2f)\n",
              s.label.c_str(), s.tensors, s.parameters, s.buckets, s.bytes / 1048576.0, median(s.update),
              median(s.cpu), s.load_busy, s.transfer_busy, s.loader_alone);
  std::printf("  %-13s build %7.2f ms = plan %7.2f + receiver %7.2f + connect %7.2f + pipeline %7.2f\n", "",
              s.built.total(), s.built.plan, s.built.receiver, s.built.connect, s.built.pipeline);
}

void emit(const options& o, const char* name, double value, double baseline) {
  if (o.json)
    std::printf("{\"name\":\"%s\",\"value\":%.3f,\"unit\":\"ms\",\"baseline\":%.3f,\"ratio\":%.3f}\n", name, value,
                baseline, value / baseline);
  else
    std::printf("  %-26s %10.2f %12.2f %8.3f\n", name, value, baseline, value / baseline);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool more = i + 1 < argc;
    if (a == "--json") o.json = true;
    else if (a == "--updates" && more) o.updates = std::max(1, std::atoi(argv[++i]));
    else if (a == "--warmup" && more) o.warmup = std::max(0, std::atoi(argv[++i]));
    else if (a == "--builds" && more) o.builds = std::max(1, std::atoi(argv[++i]));
    else if (a == "--bucket-bytes" && more) o.bucket_bytes = sl::examples::parse_bytes(argv[++i]);
    else if (a == "--loader-threads" && more) o.loader_threads = std::strtoull(argv[++i], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: bench_many_params [--updates N] [--warmup N] [--builds N] "
                           "[--bucket-bytes 16M] [--loader-threads N] [--json]\n");
      return 2;
    }
  }
  side sides[4];
  try {
    // Each many-parameter side right after its 20-tensor twin, so both see the same load.
    sides[0] = measure("20 x 4000 KiB", few_model(4000ull << 10), o);
    sides[1] = measure("20k x 4 KiB", many_model(20000, 4096), o);
    sides[2] = measure("20 x 5000 KiB", few_model(5000ull << 10), o);
    sides[3] = measure("100k x 1 KiB", many_model(100000, 1024), o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_many_params: %s\n", e.what());
    return 1;
  }
  if (!o.json) {
    std::printf("many_params: the same bytes as many small parameters and as 20 large ones, loopback, "
                "depth 2, %.0f MiB buckets, %zu loader thread(s), median of %d updates after %d\n",
                o.bucket_bytes / 1048576.0, o.loader_threads, o.updates, o.warmup);
    for (const auto& s : sides) print_side(s);
    std::printf("  cpu ratios (process CPU per update, both threads): 20k %.3f, 100k %.3f\n",
                median(sides[1].cpu) / median(sides[0].cpu), median(sides[3].cpu) / median(sides[2].cpu));
    std::printf("  %-26s %10s %12s %8s\n", "result", "value ms", "baseline ms", "ratio");
  }
  emit(o, "many_params.20k", median(sides[1].update), median(sides[0].update));
  emit(o, "many_params.100k", median(sides[3].update), median(sides[2].update));
  emit(o, "many_params.build_100k", sides[3].built.total(), sides[2].built.total());
  for (const auto& s : sides)
    if (!s.verified) return 1;
  return 0;
}
