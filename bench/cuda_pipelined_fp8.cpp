// cuda_pipelined_fp8: a whole weight update whose loader fuses and quantizes on the GPU
// (bf16 -> fp8 e4m3 with 128 x 128 block scales, q/k/v -> qkv_proj, gate/up -> gate_up_proj),
// pipelined with the transfer over cuda::ipc_transport, against the transfer alone.
//
//   bench_cuda_pipelined_fp8 [--gib G] [--rounds R] [--depth D] [--bucket-mib M] [--json]
//
// The trainer (this process, GPU 0) holds a Llama-3-8B-like model in bf16, as many layers as
// reach G GiB (default 8): embed_tokens and lm_head [128256, 4096] and final norm, and per
// layer q, o [4096, 4096], k, v [1024, 4096], gate, up [14336, 4096], down [4096, 14336] and
// two norms [4096]. The inference layout, as a block-fp8 checkpoint has it: every projection
// f8_e4m3 (fused: qkv_proj, gate_up_proj) with an f32 `<weight>_scale_inv` beside it (fused
// the same way); embed_tokens, lm_head and the norms stay bf16. The rollout engine (this
// executable again, started with posix_spawn before the parent touches CUDA, on the last
// GPU) cudaMallocs every parameter and adopts them all with a weights_receiver over a
// cuda::ipc_transport::receiver. The trainer runs update_pipeline<cuda::ipc_transport> with
// device_staging on GPU 0, and one of these loaders:
//   per-shard   the brief's loader: for each shard, enqueues on one loader stream the
//               quantizing fuse copy (trainer tensor -> staging span, scales -> a scratch
//               buffer), or cudaMemcpyAsync of a bf16 tensor, or of the scales computed by
//               its weight's kernel; then records an event and co_awaits cuda::async_wait on
//               it, so the shard reaches the barrier only when its GPU work is done;
//   per-bucket  at a bucket's first shard, enqueues every shard of the bucket (one fuse
//               launch per kind, then the scale copies) and waits once; the bucket's other
//               shards find the work done (cudaEventQuery) or wait for the same event;
//   transfer    the transfer alone: the loader does nothing (the staging holds whatever it
//               held), the baseline.
// Rounds alternate the three; each round times one update from async_update to the commit's
// acknowledgement. Also measured, once per round: "load alone", every bucket's loads enqueued
// back to back (one fuse launch per bucket) into one slot-sized buffer, to the stream's end;
// load alone + transfer alone is what loading everything and then transferring would take.
// JSON (one object per line): GB/s of wire bytes (bytes the receiver gets per update over the
// median update time); baseline: the transfer alone's; ratio = transfer-alone time /
// pipelined time (>= 0.9: loading hidden behind the wire).
//
// Verification: after the timed rounds the trainer refills its tensors with new values and
// pushes version N-1 with the per-bucket loader, then refills again and pushes version N with
// the per-shard loader (so stale staging cannot pass); after each the receiver checks, for
// every shard of every parameter, three 128 x 128 blocks of each fp8 weight against
// cuda::quantize_e4m3_on_host of the same bf16 values, the scales of those blocks bit for
// bit, and three rows of each bf16 tensor. With no usable GPU it says so and exits 0.
#include <shardline/cuda/async_wait.hpp>
#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/fp8.hpp>
#include <shardline/cuda/fuse.hpp>
#include <shardline/cuda/ipc_transport.hpp>
#include <shardline/cuda/staging.hpp>
#include <shardline/cuda/stream.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <gpu_kernels.hpp>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

extern char** environ;

namespace sl = shardline;
namespace cuda = shardline::cuda;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

constexpr cuda::fp8_block scale_block{128, 128};

void check(cudaError_t e, const std::string& what) { cuda::throw_if(e, what); }

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

// ---- the model: the trainer's tensors and what the inference layout makes of them --------

// One trainer tensor, bf16, seen as a rows x cols matrix (a norm [n] as 1 x n).
struct trainer_tensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::int64_t rows = 0, cols = 0;
  bool quantized = false;       // f8_e4m3 (+ scales) in the inference layout, else bf16
  std::size_t offset = 0;       // in the trainer's flat buffer
  std::size_t scale_offset = 0; // quantized: its scales in the scratch buffer (bytes)
  std::uint64_t bf16_bytes() const { return static_cast<std::uint64_t>(rows * cols) * 2; }
};

// What a plan shard's source tensor is: a trainer tensor's quantized weight, its scales, or a
// bf16 tensor placed as it is.
enum class shard_kind { weight, scales, plain };

struct shard_source_ref {
  std::size_t tensor;
  shard_kind kind;
};

struct model {
  std::vector<trainer_tensor> tensors;
  std::vector<sl::parameter_descriptor> sources;  // the plan's sources, in destination dtypes
  std::unordered_map<std::string, shard_source_ref> by_source;  // built once; read per shard
  std::size_t flat_bytes = 0, scale_bytes = 0;
  std::size_t layers = 0;

  explicit model(double gib) {
    const std::int64_t h = 4096, kv = 1024, ffn = 14336, vocab = 128256;
    const auto add = [this](std::string name, std::vector<std::int64_t> shape) {
      trainer_tensor t;
      t.name = std::move(name);
      t.shape = std::move(shape);
      t.rows = t.shape.size() == 1 ? 1 : t.shape[0];
      t.cols = t.shape.back();
      t.quantized = t.shape.size() == 2 && t.name.find("_proj.") != std::string::npos;
      t.offset = flat_bytes;
      flat_bytes += round_up(t.bf16_bytes(), 256);
      if (t.quantized) {
        t.scale_offset = scale_bytes;
        const auto s = cuda::fp8_scale_shape(t.name, t.shape, scale_block);
        scale_bytes += round_up(static_cast<std::size_t>(s[0] * s[1]) * 4, 256);
      }
      tensors.push_back(std::move(t));
    };
    add("model.embed_tokens.weight", {vocab, h});
    const auto target = static_cast<std::size_t>(gib * double(std::size_t(1) << 30));
    const std::size_t tail = static_cast<std::size_t>(vocab * h * 2 + h * 2);  // lm_head, final norm
    for (; flat_bytes + tail < target; ++layers) {
      const std::string p = "model.layers." + std::to_string(layers) + ".";
      add(p + "input_layernorm.weight", {h});
      add(p + "self_attn.q_proj.weight", {h, h});
      add(p + "self_attn.k_proj.weight", {kv, h});
      add(p + "self_attn.v_proj.weight", {kv, h});
      add(p + "self_attn.o_proj.weight", {h, h});
      add(p + "post_attention_layernorm.weight", {h});
      add(p + "mlp.gate_proj.weight", {ffn, h});
      add(p + "mlp.up_proj.weight", {ffn, h});
      add(p + "mlp.down_proj.weight", {h, ffn});
    }
    add("model.norm.weight", {h});
    add("lm_head.weight", {vocab, h});
    // Each scale tensor right after its weight: the fused scales then come after the fused
    // weight in plan order, which the loaders rely on (a scale shard copies what its weight's
    // kernel computed).
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const trainer_tensor& t = tensors[i];
      if (!t.quantized) {
        sources.push_back({t.name, sl::dtype::bf16, t.shape});
        by_source.emplace(t.name, shard_source_ref{i, shard_kind::plain});
        continue;
      }
      const sl::parameter_descriptor weight{t.name, sl::dtype::f8_e4m3, t.shape};
      sources.push_back(weight);
      sources.push_back(cuda::fp8_scale_parameter(weight, scale_block));
      by_source.emplace(t.name, shard_source_ref{i, shard_kind::weight});
      by_source.emplace(sources.back().name, shard_source_ref{i, shard_kind::scales});
    }
  }

  sl::transfer_plan plan(std::uint64_t bucket_bytes) const {
    sl::plan_options o;
    o.bucket_bytes = bucket_bytes;
    return sl::transfer_plan::build(sources, sl::shard_map::standard(), o);
  }

  std::uint64_t bf16_total() const {
    std::uint64_t n = 0;
    for (const auto& t : tensors) n += t.bf16_bytes();
    return n;
  }
};

// The values a trainer tensor holds in epoch `epoch` (timed rounds: 0; verification: 1, 2).
std::uint32_t seed_of(std::size_t tensor, int epoch) {
  return static_cast<std::uint32_t>(tensor * 7919 + 1 + static_cast<std::size_t>(epoch) * 1000003);
}

// ---- the receiver process ---------------------------------------------------------------

// The expected fp8 bytes and scale of block (br, bc) of trainer tensor `t` in `epoch`.
struct reference_block {
  std::int64_t rows, cols;
  std::vector<std::uint8_t> bytes;
  float scale_inv;
};

reference_block quantize_reference(const trainer_tensor& t, std::size_t index, int epoch, std::int64_t br,
                                   std::int64_t bc) {
  reference_block b;
  b.rows = std::min(scale_block.rows, t.rows - br * scale_block.rows);
  b.cols = std::min(scale_block.cols, t.cols - bc * scale_block.cols);
  std::vector<std::uint16_t> source(static_cast<std::size_t>(b.rows * b.cols));
  for (std::int64_t r = 0; r < b.rows; ++r)
    for (std::int64_t c = 0; c < b.cols; ++c)
      source[r * b.cols + c] =
          gpu_test::weight_bf16(seed_of(index, epoch), br * scale_block.rows + r, bc * scale_block.cols + c);
  b.bytes.resize(source.size());
  cuda::quantize_e4m3_on_host(source.data(), b.cols, b.bytes.data(), b.cols, &b.scale_inv, 1, b.rows, b.cols,
                              scale_block);
  return b;
}

// Checks every shard of every parameter of `plan` in the receiver's memory against epoch
// `epoch` of the trainer's values; returns the number of samples that differ.
std::size_t verify(const model& m, const sl::transfer_plan& plan,
                   const std::unordered_map<std::string, std::byte*>& memory, int epoch, std::size_t& samples) {
  std::size_t bad = 0;
  const auto report = [&bad](const std::string& what) {
    if (++bad <= 10) std::fprintf(stderr, "receiver: %s differs\n", what.c_str());
  };
  for (const auto& bucket : plan.buckets())
    for (const auto& p : bucket.parameters) {
      const std::byte* param = memory.at(p.parameter.destination.name);
      for (const auto& shard : p.parameter.shards) {
        const shard_source_ref ref = m.by_source.at(shard.tensor.name);
        const trainer_tensor& t = m.tensors[ref.tensor];
        const std::byte* at = param + shard.offset;
        const std::string who = "'" + p.parameter.destination.name + "' shard '" + shard.tensor.name + "'";
        if (ref.kind == shard_kind::plain) {
          for (std::int64_t r : {std::int64_t(0), t.rows / 2, t.rows - 1}) {
            std::vector<std::uint16_t> got(static_cast<std::size_t>(t.cols));
            check(cudaMemcpy(got.data(), at + r * t.cols * 2, got.size() * 2, cudaMemcpyDeviceToHost), "cudaMemcpy");
            bool same = true;
            for (std::int64_t c = 0; c < t.cols; ++c)
              same = same && got[c] == gpu_test::weight_bf16(seed_of(ref.tensor, epoch), r, c);
            ++samples;
            if (!same) report(who + " row " + std::to_string(r));
          }
          continue;
        }
        const std::int64_t row_blocks = (t.rows + scale_block.rows - 1) / scale_block.rows;
        const std::int64_t col_blocks = (t.cols + scale_block.cols - 1) / scale_block.cols;
        for (auto [br, bc] : {std::pair<std::int64_t, std::int64_t>{0, 0}, {row_blocks / 2, col_blocks / 2},
                              {row_blocks - 1, col_blocks - 1}}) {
          const reference_block want = quantize_reference(t, ref.tensor, epoch, br, bc);
          const std::string block = " block (" + std::to_string(br) + ", " + std::to_string(bc) + ")";
          ++samples;
          if (ref.kind == shard_kind::scales) {
            float got = 0;
            check(cudaMemcpy(&got, at + (br * col_blocks + bc) * 4, 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
            if (std::memcmp(&got, &want.scale_inv, 4) != 0) report(who + block + " scale");
            continue;
          }
          std::vector<std::uint8_t> got(want.bytes.size());
          check(cudaMemcpy2D(got.data(), want.cols, at + br * scale_block.rows * t.cols + bc * scale_block.cols, t.cols,
                             want.cols, want.rows, cudaMemcpyDeviceToHost),
                "cudaMemcpy2D");
          const bool zeros = std::all_of(want.bytes.begin(), want.bytes.end(), [](std::uint8_t x) { return x == 0; });
          if (zeros || got != want.bytes) report(who + block + (zeros ? " (reference all zeros)" : ""));
        }
      }
    }
  return bad;
}

asio::awaitable<void> accept_forever(cuda::ipc_transport::receiver& rx) {
  while (true) {
    auto [ec, sender] = co_await rx.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
    (void)sender;
    if (ec == asio::error::operation_aborted || ec == sl::errc::not_connected) co_return;
  }
}

int run_receiver(const std::string& path, double gib, std::uint64_t bucket_bytes, int device, std::uint32_t last) {
  try {
    check(cudaSetDevice(device), "cudaSetDevice");
    const model m(gib);
    const auto plan = m.plan(bucket_bytes);
    asio::io_context io;
    cuda::ipc_options o;
    o.device = device;
    cuda::ipc_transport::receiver rx(io.get_executor(), path, o);
    // One cudaMalloc per parameter, as an engine's caching allocator gives large tensors.
    std::vector<cuda::device_buffer> buffers;
    std::vector<sl::engine_tensor> tensors;
    std::unordered_map<std::string, std::byte*> memory;
    for (const auto& p : plan.receiver_parameters(0)) {
      buffers.emplace_back(p.bytes(), device);
      tensors.push_back({p.name, p.type, p.shape, buffers.back().bytes(), sl::memory_location::cuda(device)});
      memory.emplace(p.name, buffers.back().data());
    }
    sl::weights_receiver<cuda::ipc_transport::receiver> weights(rx, plan, 0, tensors);
    std::fprintf(stderr, "receiver: adopted %zu device tensors (%zu allocations exported) on GPU %d\n", tensors.size(),
                 rx.exported_allocations(), device);
    asio::co_spawn(io, accept_forever(rx), asio::detached);
    int status = 5;  // no verified commit yet
    std::size_t verified = 0;
    std::function<void()> next = [&] {
      weights.async_wait_commit([&](std::error_code ec, std::uint32_t version) {
        if (ec) {
          std::fprintf(stderr, "receiver: version %u: %s\n", version, ec.message().c_str());
          status = 4;
          rx.close();
          return io.stop();
        }
        if (version + 1 >= last) {  // the two verification versions: epochs 1 and 2
          const int epoch = version + 1 == last ? 1 : 2;
          std::size_t samples = 0;
          const std::size_t bad = verify(m, plan, memory, epoch, samples);
          std::fprintf(stderr, "receiver: version %u (epoch %d): %zu samples of %zu parameters checked: %s\n", version,
                       epoch, samples, tensors.size(), bad ? "SOME DIFFER" : "all equal");
          if (bad) status = 3;
          else if (++verified == 2 && status == 5) status = 0;
        }
        if (version >= last) {
          rx.close();
          return io.stop();
        }
        next();
      });
    };
    next();
    io.run_for(540s);
    return status;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "receiver: %s\n", e.what());
    return 2;
  }
}

// ---- the trainer's loaders --------------------------------------------------------------

// One shard of the plan as the loaders see it, found by the address of its source descriptor
// in the pipeline's plan (what shard_load::tensor refers to).
struct shard_job {
  std::size_t tensor;
  shard_kind kind;
  std::size_t bucket;
  std::uint64_t slot_offset;  // parameter staging offset + shard offset, inside the bucket's slot
  std::uint64_t bytes;
};

// A per-tensor "its weight's kernel is enqueued" signal, for the scale shard that copies what
// that kernel computed (it may be loaded by another bucket, before the weight's).
struct enqueued_signal {
  explicit enqueued_signal(const asio::any_io_executor& ex) : bell(ex, 1) {}
  std::uint32_t version = 0;  // the update whose kernel for this weight is enqueued
  // (void(error_code) alone is ambiguous among Asio 1.22's channel traits.)
  asio::experimental::channel<void(std::error_code, bool)> bell;
};

// How the loaders await their GPU work: polled on the io_context (about 5 us from the kernel's
// end to the coroutine, against about 50 us for the stream callback: cuda.event_await_*).
constexpr cuda::wait_mode loader_wait = cuda::wait_mode::adaptive;

struct bucket_state {
  std::uint32_t version = 0;  // per-bucket loader: the update whose work for this bucket is enqueued
  cuda::event done;
};

class loader_state {
public:
  loader_state(asio::any_io_executor ex, const model& m, const cuda::device_buffer& source,
               const cuda::device_buffer& scales, const sl::transfer_plan& plan)
      : executor_(ex), model_(m), source_(source), scales_(scales), stream_(0), shard_done_(0) {
    for (std::size_t t = 0; t < m.tensors.size(); ++t) signals_.push_back(std::make_unique<enqueued_signal>(ex));
    buckets_.resize(plan.buckets().size());
    bucket_jobs_.resize(plan.buckets().size());
    for (std::size_t b = 0; b < plan.buckets().size(); ++b) {
      buckets_[b].done = cuda::event(0);
      for (const auto& p : plan.buckets()[b].parameters)
        for (const auto& s : p.parameter.shards) {
          const shard_source_ref ref = m.by_source.at(s.tensor.name);
          const shard_job job{ref.tensor, ref.kind, b, p.staging_offset + s.offset, s.tensor.bytes()};
          jobs_.emplace(&s.tensor, job);
          bucket_jobs_[b].push_back(job);
        }
    }
  }

  const cuda::stream& stream() const { return stream_; }

  // The brief's loader: this shard's work alone, awaited alone.
  static asio::awaitable<void> per_shard(loader_state* s, const sl::parameter_descriptor* key, std::byte* staging,
                                         std::uint32_t version) {
    const shard_job& job = s->jobs_.at(key);
    if (job.kind == shard_kind::scales) co_await s->weight_enqueued(job.tensor, version);
    s->enqueue(job, staging, version);
    s->shard_done_.record(s->stream_);
    // The wait copies the event at once (a stream of its own waits for it): the loader stream
    // is never held up by the wait, and the next shard's record does not move this one.
    co_await cuda::async_wait(s->executor_, s->shard_done_, loader_wait, asio::use_awaitable);
  }

  // The whole bucket at its first shard; each shard completes once the bucket's work is done.
  static asio::awaitable<void> per_bucket(loader_state* s, const sl::parameter_descriptor* key, std::byte* staging,
                                          std::uint32_t version) {
    const shard_job& job = s->jobs_.at(key);
    bucket_state& b = s->buckets_[job.bucket];
    if (b.version != version) {
      for (const shard_job& j : s->bucket_jobs_[job.bucket])
        if (j.kind == shard_kind::scales) co_await s->weight_enqueued_unless_here(j, version);
      s->enqueue_bucket(job.bucket, staging - job.slot_offset, version);
      b.version = version;
      b.done.record(s->stream_);
    }
    if (b.done.ready()) co_return;
    co_await cuda::async_wait(s->executor_, b.done, loader_wait, asio::use_awaitable);
  }

  // Enqueues every bucket back to back into one slot at `slot` (load alone).
  void enqueue_all(std::byte* slot, std::uint32_t version) {
    for (std::size_t b = 0; b < buckets_.size(); ++b) enqueue_bucket(b, slot, version);
  }

private:
  // Waits until the kernel of tensor t's weight is enqueued in `version` (the stream then
  // orders the scale copy after it).
  asio::awaitable<void> weight_enqueued(std::size_t t, std::uint32_t version) {
    enqueued_signal& sig = *signals_[t];
    while (sig.version != version) co_await sig.bell.async_receive(asio::use_awaitable);
  }
  // As weight_enqueued, unless the weight is in the scale job's own bucket (enqueued with it).
  asio::awaitable<void> weight_enqueued_unless_here(const shard_job& scale, std::uint32_t version) {
    for (const shard_job& j : bucket_jobs_[scale.bucket])
      if (j.tensor == scale.tensor && j.kind == shard_kind::weight) co_return;
    co_await weight_enqueued(scale.tensor, version);
  }

  void mark_enqueued(std::size_t t, std::uint32_t version) {
    signals_[t]->version = version;
    (void)signals_[t]->bell.try_send(std::error_code{}, true);
  }

  cuda::fuse_copy copy_of(const shard_job& j, std::byte* staging) const {
    const trainer_tensor& t = model_.tensors[j.tensor];
    const cuda::source_matrix source{t.name, source_.data() + t.offset, sl::dtype::bf16, t.rows, t.cols, 0};
    cuda::destination_matrix destination{t.name, staging, sl::dtype::bf16, t.rows, t.cols, 0};
    if (j.kind == shard_kind::weight) {
      destination.type = sl::dtype::f8_e4m3;
      destination.scales = reinterpret_cast<float*>(scales_.data() + t.scale_offset);
      destination.block = scale_block;
    }
    return cuda::whole(source, destination);
  }

  void copy_scales(const shard_job& j, std::byte* staging) {
    check(cudaMemcpyAsync(staging, scales_.data() + model_.tensors[j.tensor].scale_offset, j.bytes,
                          cudaMemcpyDeviceToDevice, stream_.native_handle()),
          "cudaMemcpyAsync of scales");
  }

  void enqueue(const shard_job& j, std::byte* staging, std::uint32_t version) {
    switch (j.kind) {
      case shard_kind::weight: {
        const cuda::fuse_copy c = copy_of(j, staging);
        gpu_test::fuse(&c, 1, stream_.native_handle());
        mark_enqueued(j.tensor, version);
        break;
      }
      case shard_kind::scales: copy_scales(j, staging); break;
      case shard_kind::plain:
        check(cudaMemcpyAsync(staging, source_.data() + model_.tensors[j.tensor].offset, j.bytes,
                              cudaMemcpyDeviceToDevice, stream_.native_handle()),
              "cudaMemcpyAsync of a bf16 tensor");
        break;
    }
  }

  // One fuse launch per kind for the bucket's weights and bf16 tensors, then its scale copies.
  void enqueue_bucket(std::size_t b, std::byte* slot, std::uint32_t version) {
    copies_.clear();
    for (const shard_job& j : bucket_jobs_[b])
      if (j.kind != shard_kind::scales) copies_.push_back(copy_of(j, slot + j.slot_offset));
    gpu_test::fuse(copies_.data(), copies_.size(), stream_.native_handle());
    for (const shard_job& j : bucket_jobs_[b])
      if (j.kind == shard_kind::weight) mark_enqueued(j.tensor, version);
    for (const shard_job& j : bucket_jobs_[b])
      if (j.kind == shard_kind::scales) copy_scales(j, slot + j.slot_offset);
  }

  asio::any_io_executor executor_;
  const model& model_;
  const cuda::device_buffer& source_;
  const cuda::device_buffer& scales_;
  cuda::stream stream_;
  cuda::event shard_done_;
  std::unordered_map<const sl::parameter_descriptor*, shard_job> jobs_;
  std::vector<std::vector<shard_job>> bucket_jobs_;
  std::vector<std::unique_ptr<enqueued_signal>> signals_;
  std::vector<bucket_state> buckets_;
  std::vector<cuda::fuse_copy> copies_;
};

// The loaders as the pipeline takes them (shard_loader: returns asio::awaitable<void>).
struct per_shard_loader {
  loader_state* state;
  asio::awaitable<void> operator()(const sl::shard_load& l) const {
    return loader_state::per_shard(state, &l.tensor, l.staging.data(), l.version);
  }
};
struct per_bucket_loader {
  loader_state* state;
  asio::awaitable<void> operator()(const sl::shard_load& l) const {
    return loader_state::per_bucket(state, &l.tensor, l.staging.data(), l.version);
  }
};
// The baseline: the staging already holds the bytes.
struct no_loader {
  void operator()(const sl::shard_load&) const {}
};
static_assert(sl::shard_loader<per_shard_loader> && sl::shard_loader<per_bucket_loader> && sl::shard_loader<no_loader>);

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double ms(clock_type::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

}  // namespace

int main(int argc, char** argv) {
  double gib = 8;
  int rounds = 5;
  std::size_t depth = 4;
  std::uint64_t bucket_mib = 64;
  bool json = false;
  std::string receiver_spec;
  std::uint32_t last = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") json = true;
    else if (a == "--gib" && i + 1 < argc) gib = std::atof(argv[++i]);
    else if (a == "--rounds" && i + 1 < argc) rounds = std::max(1, std::atoi(argv[++i]));
    else if (a == "--depth" && i + 1 < argc) depth = static_cast<std::size_t>(std::max(1, std::atoi(argv[++i])));
    else if (a == "--bucket-mib" && i + 1 < argc) bucket_mib = static_cast<std::uint64_t>(std::max(1, std::atoi(argv[++i])));
    else if (a == "--receiver" && i + 1 < argc) receiver_spec = argv[++i];
    else if (a == "--last" && i + 1 < argc) last = static_cast<std::uint32_t>(std::atoi(argv[++i]));
    else {
      std::fprintf(stderr,
                   "usage: bench_cuda_pipelined_fp8 [--gib G] [--rounds R] [--depth D] [--bucket-mib M] [--json]\n");
      return 2;
    }
  }
  const std::uint64_t bucket_bytes = bucket_mib << 20;
  if (!receiver_spec.empty()) {  // PATH,DEVICE
    const auto comma = receiver_spec.find(',');
    return run_receiver(receiver_spec.substr(0, comma), gib, bucket_bytes,
                        std::atoi(receiver_spec.c_str() + comma + 1), last);
  }
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_pipelined_fp8: skipped: no GPU (%s)\n", cuda::unavailable_reason().c_str());
    return 0;
  }
  const int gpus = cuda::device_count();
  const int target = gpus > 1 ? 1 : 0;
  // Versions: one warm-up update per loader, `rounds` timed rounds of three, then the two
  // verified updates.
  const auto timed_versions = static_cast<std::uint32_t>(3 + 3 * rounds);
  last = timed_versions + 2;

  const std::string path = "/tmp/shardline-bench-fp8-" + std::to_string(::getpid()) + ".sock";
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return 2;
  self[n] = '\0';
  std::vector<std::string> args{self,     "--receiver", path + "," + std::to_string(target), "--gib",
                                std::to_string(gib), "--bucket-mib", std::to_string(bucket_mib), "--last",
                                std::to_string(last)};
  std::vector<char*> argv_child;
  for (auto& a : args) argv_child.push_back(a.data());
  argv_child.push_back(nullptr);
  pid_t child = -1;
  if (posix_spawn(&child, self, nullptr, nullptr, argv_child.data(), environ) != 0) return 2;

  try {
    check(cudaSetDevice(0), "cudaSetDevice");
    const model m(gib);
    const auto plan = m.plan(bucket_bytes);
    cuda::device_buffer source(m.flat_bytes, 0), scales(std::max<std::size_t>(m.scale_bytes, 256), 0);
    cuda::stream fill_stream(0);
    const auto fill = [&](int epoch) {
      for (std::size_t i = 0; i < m.tensors.size(); ++i) {
        const trainer_tensor& t = m.tensors[i];
        check(gpu_test::fill_weights_bf16(reinterpret_cast<std::uint16_t*>(source.data() + t.offset), t.rows, t.cols,
                                          seed_of(i, epoch), fill_stream.native_handle()),
              "fill_weights_bf16");
      }
      fill_stream.synchronize();
    };
    fill(0);

    asio::io_context io;
    cuda::ipc_transport transport(io.get_executor());
    std::optional<cuda::ipc_transport::connection> conn;
    const auto connecting = clock_type::now();
    for (int attempt = 0; !conn && attempt < 3000; ++attempt) {
      std::optional<std::error_code> got;
      transport.async_connect(path, {0, plan.fingerprint()}, [&](std::error_code ec, cuda::ipc_transport::connection c) {
        got = ec;
        if (!ec) conn.emplace(std::move(c));
      });
      while (!got) io.run_one();
      io.restart();
      if (*got && *got != std::errc::no_such_file_or_directory && *got != std::errc::connection_refused)
        throw sl::error(*got, "connect to the receiver");
      if (!conn) std::this_thread::sleep_for(20ms);
    }
    if (!conn) throw std::runtime_error("the receiver never listened");
    const double connect_ms = ms(clock_type::now() - connecting);

    using config = sl::pipeline_config<4, sl::no_tracer, 64, (std::uint64_t(1) << 30), cuda::device_staging>;
    sl::pipeline_options options;
    options.depth = depth;
    options.loader_threads = 0;  // the no-op loader runs on the io_context
    sl::update_pipeline<cuda::ipc_transport, config> pipeline(transport, plan, {&*conn}, options,
                                                              cuda::device_staging{0});
    loader_state state(io.get_executor(), m, source, scales, pipeline.plan());

    const auto update = [&](std::uint32_t version, auto loader) {
      std::optional<std::pair<std::exception_ptr, sl::update_report>> got;
      pipeline.async_update(version, loader, [&](std::exception_ptr e, sl::update_report r) {
        got.emplace(e, std::move(r));
      });
      while (!got) io.run_one();
      io.restart();
      if (got->first) std::rethrow_exception(got->first);
      return std::move(got->second);
    };
    cuda::device_buffer load_slot(round_up(plan.max_staging_bytes(), 4096), 0);
    const auto load_alone = [&](std::uint32_t version) {
      const auto start = clock_type::now();
      state.enqueue_all(load_slot.data(), version);
      state.stream().synchronize();
      return ms(clock_type::now() - start);
    };

    struct series {
      const char* name;
      std::vector<double> ms, load_busy, transfer_busy;
      std::uint64_t wire = 0;
      void add(const sl::update_report& r) {
        ms.push_back(::ms(r.elapsed()));
        load_busy.push_back(::ms(r.load_busy()));
        transfer_busy.push_back(::ms(r.transfer_busy()));
        wire = r.wire_bytes;
      }
    };
    series shard{"per-shard loader"}, bucket{"per-bucket loader"}, alone{"transfer alone"};
    std::vector<double> loads;
    std::uint32_t version = 0;
    // Warm-up: one update of each kind, untimed.
    update(++version, no_loader{});
    update(++version, per_shard_loader{&state});
    update(++version, per_bucket_loader{&state});
    load_alone(version);
    for (int r = 0; r < rounds; ++r) {
      alone.add(update(++version, no_loader{}));
      shard.add(update(++version, per_shard_loader{&state}));
      bucket.add(update(++version, per_bucket_loader{&state}));
      loads.push_back(load_alone(version));
    }
    // Verified updates, each from values the staging never held.
    fill(1);
    update(++version, per_bucket_loader{&state});
    fill(2);
    update(++version, per_shard_loader{&state});
    conn->close();
    int status = 0;
    ::waitpid(child, &status, 0);
    const int receiver_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);

    const double wire_gb = double(alone.wire) / 1e9;
    const double t_alone = median(alone.ms), t_shard = median(shard.ms), t_bucket = median(bucket.ms);
    const double t_load = median(loads);
    FILE* table = json ? stderr : stdout;
    std::fprintf(table,
                 "cuda_pipelined_fp8: %zu layers, %zu trainer tensors, %.2f GiB bf16 -> %zu parameters, %.3f GB on the "
                 "wire per update; GPU 0 -> GPU %d (%d GPUs); %zu buckets of <= %llu MiB, depth %zu; connect %.1f ms\n",
                 m.layers, m.tensors.size(), double(m.bf16_total()) / double(std::size_t(1) << 30),
                 plan.parameter_count(), wire_gb, target, gpus, plan.buckets().size(),
                 static_cast<unsigned long long>(bucket_mib), pipeline.depth(), connect_ms);
    std::fprintf(table, "  %-22s", "round (ms per update)");
    for (int r = 0; r < rounds; ++r) std::fprintf(table, " %8d", r + 1);
    std::fprintf(table, " %8s %9s %10s %10s\n", "median", "GB/s", "load busy", "xfer busy");
    for (const series* s : {&alone, &shard, &bucket}) {
      std::fprintf(table, "  %-22s", s->name);
      for (double x : s->ms) std::fprintf(table, " %8.2f", x);
      std::fprintf(table, " %8.2f %9.1f %10.2f %10.2f\n", median(s->ms), wire_gb / (median(s->ms) / 1e3),
                   median(s->load_busy), median(s->transfer_busy));
    }
    std::fprintf(table, "  %-22s", "load alone (GPU)");
    for (double x : loads) std::fprintf(table, " %8.2f", x);
    std::fprintf(table, " %8.2f  (%.1f GB/s of bf16 read)\n", t_load, double(m.bf16_total()) / 1e9 / (t_load / 1e3));
    std::fprintf(table, "  load then transfer (sum of medians): %.2f ms\n", t_load + t_alone);
    std::fprintf(table, "  ratio transfer-alone / pipelined: per-shard %.3f, per-bucket %.3f; sequential / per-shard %.3f\n",
                 t_alone / t_shard, t_alone / t_bucket, (t_load + t_alone) / t_shard);
    std::fprintf(table, "  receiver exit status %d (0: every sample of both verified versions as the CPU reference)\n",
                 receiver_status);
    if (json) {
      const auto line = [&](const char* name, double value, double baseline) {
        std::printf("{\"name\":\"%s\",\"value\":%.1f,\"unit\":\"GB/s\",\"baseline\":%.1f,\"ratio\":%.3f}\n", name, value,
                    baseline, value / baseline);
      };
      line("cuda.pipelined_fp8", wire_gb / (t_shard / 1e3), wire_gb / (t_alone / 1e3));
      line("cuda.pipelined_fp8_per_bucket", wire_gb / (t_bucket / 1e3), wire_gb / (t_alone / 1e3));
      line("cuda.pipelined_fp8_vs_sequential", wire_gb / (t_shard / 1e3), wire_gb / ((t_load + t_alone) / 1e3));
    }
    return receiver_status == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_pipelined_fp8: %s\n", e.what());
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    return 1;
  }
}
