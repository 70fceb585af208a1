// shardline/pipeline.hpp: one weight version pushed to every receiver as an awaitable
// pipeline of buckets: load shards -> per-parameter barrier -> writes -> commit.
#pragma once

#include <shardline/detail/run_on.hpp>
#include <shardline/detail/wait_group.hpp>
#include <shardline/error.hpp>
#include <shardline/inflight_limiter.hpp>
#include <shardline/memory.hpp>
#include <shardline/shard_barrier.hpp>
#include <shardline/trace.hpp>
#include <shardline/transfer_plan.hpp>
#include <shardline/transport.hpp>

#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/this_coro.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace shardline {

/// What the user's loader is asked to do: fill `staging` (exactly tensor.bytes() bytes)
/// with source tensor `tensor`, already converted to the destination dtype.
struct shard_load {
  const parameter_descriptor& tensor;
  const parameter_descriptor& destination;
  std::size_t shard_index;
  std::span<std::byte> staging;
  std::uint32_t version;
};

/// A loader is called once per shard. It returns void (run on the pipeline's loader
/// threads, so it never blocks the io_context) or asio::awaitable<void> (run on the
/// io_context, for loaders that are themselves asynchronous).
template <class L>
concept shard_loader =
    std::invocable<L&, const shard_load&> &&
    (std::is_void_v<std::invoke_result_t<L&, const shard_load&>> ||
     std::is_same_v<std::invoke_result_t<L&, const shard_load&>, asio::awaitable<void>>);

/// Compile-time configuration. `Tracer` = no_tracer compiles every trace call away.
template <std::size_t Depth = 2, class Tracer = no_tracer, std::size_t MaxOperations = 64,
          std::uint64_t MaxBytes = (std::uint64_t(1) << 30)>
struct pipeline_config {
  static_assert(Depth >= 1, "a pipeline needs at least one staging slot");
  static constexpr std::size_t depth = Depth;
  static constexpr inflight_limits limits{MaxOperations, MaxBytes};
  using tracer_type = Tracer;
};

/// Runtime overrides of the configuration.
struct pipeline_options {
  std::size_t depth = 0;                       ///< buckets in flight; 0: the config's
  std::optional<inflight_limits> limits;       ///< outstanding write batches and bytes
  std::chrono::milliseconds shard_timeout{30000};  ///< longest wait for a parameter's shards
  std::size_t loader_threads = 1;              ///< threads for void loaders; 0: on the io_context
};

struct bucket_report {
  using clock = std::chrono::steady_clock;
  std::size_t index = 0;
  std::uint64_t bytes = 0;  ///< staging bytes (full parameters)
  clock::time_point load_start{}, load_end{}, transfer_start{}, transfer_end{};
  clock::duration load_time() const { return load_end - load_start; }
  clock::duration transfer_time() const { return transfer_end - transfer_start; }
};

struct update_report {
  using clock = std::chrono::steady_clock;
  std::uint32_t version = 0;
  std::uint64_t bytes = 0;       ///< staging bytes loaded
  std::uint64_t wire_bytes = 0;  ///< bytes written, summed over receivers
  clock::time_point start{}, end{};
  std::vector<bucket_report> buckets;

  clock::duration elapsed() const { return end - start; }
  clock::duration total_load() const {
    clock::duration d{};
    for (const auto& b : buckets) d += b.load_time();
    return d;
  }
  /// Time the transport was busy: the union of the buckets' transfer intervals (they
  /// overlap when several buckets are in flight, so a plain sum would count twice).
  clock::duration total_transfer() const {
    std::vector<std::pair<clock::time_point, clock::time_point>> spans;
    for (const auto& b : buckets) spans.emplace_back(b.transfer_start, b.transfer_end);
    std::sort(spans.begin(), spans.end());
    clock::duration busy{};
    clock::time_point covered{};
    for (const auto& [from, to] : spans) {
      const auto start = std::max(from, covered);
      if (to > start) busy += to - start;
      covered = std::max(covered, to);
    }
    return busy;
  }
  /// The best a pipeline can do: max(sum of loads, sum of transfers) + the first load.
  clock::duration ideal() const {
    if (buckets.empty()) return {};
    return std::max(total_load(), total_transfer()) + buckets.front().load_time();
  }
  /// ideal / actual makespan, 1.0 for perfect overlap.
  double overlap_efficiency() const {
    const double actual = std::chrono::duration<double>(elapsed()).count();
    return actual > 0 ? std::chrono::duration<double>(ideal()).count() / actual : 0.0;
  }
};

/// Pushes weight versions through `Transport` to the receivers of a transfer_plan.
///
/// async_update runs one version: for each bucket (at most `depth` in flight, each in its
/// own staging slot) the loader fills every shard; a parameter is written to all its
/// receivers as soon as its last shard is in, without waiting for the rest of its bucket;
/// a staging slot is reused only after every write from it completed. Once every write of
/// every bucket completed, each receiver gets the commit notification `version`. On any
/// error or cancellation no receiver is notified.
///
/// Thread safety: one update at a time; use from the transport's executor.
template <transport Transport, class Config = pipeline_config<>>
class update_pipeline {
public:
  using executor_type = typename Transport::executor_type;
  using connection_type = typename Transport::connection;
  using tracer_type = typename Config::tracer_type;
  using clock = std::chrono::steady_clock;

  /// `receivers[r]` is the connection to the plan's receiver r. Throws shardline::error
  /// naming the parameter and receiver when a receiver does not expose a planned parameter
  /// (errc::unknown_parameter) or exposes it with another size (errc::size_mismatch).
  update_pipeline(Transport& transport, transfer_plan plan, std::vector<connection_type*> receivers,
                  pipeline_options options = {})
      : executor_(transport.get_executor()),
        plan_(std::move(plan)),
        receivers_(std::move(receivers)),
        options_(options),
        depth_(options.depth ? options.depth : Config::depth),
        slot_bytes_(align(std::max<std::uint64_t>(plan_.max_staging_bytes(), 1))),
        staging_(new std::byte[slot_bytes_ * depth_]),
        registration_(transport.register_memory({staging_.get(), slot_bytes_ * depth_})),
        barrier_(executor_),
        limiter_(executor_, options.limits.value_or(Config::limits)),
        slots_(executor_, inflight_limits{depth_, 0}) {
    if (receivers_.size() != plan_.receivers())
      throw error(make_error_code(errc::invalid_argument),
                  "update_pipeline: the plan has " + std::to_string(plan_.receivers()) +
                      " receivers but " + std::to_string(receivers_.size()) +
                      " connections were given");
    resolve_regions();
    for (const auto& b : plan_.buckets())
      for (const auto& p : b.parameters)
        barrier_.expect(p.parameter.destination.name, p.parameter.shards.size(),
                        p.parameter.shard_names());
    if (options_.loader_threads > 0) loader_pool_.emplace(options_.loader_threads);
  }

  ~update_pipeline() {
    if (loader_pool_) loader_pool_->join();
  }

  update_pipeline(const update_pipeline&) = delete;
  update_pipeline& operator=(const update_pipeline&) = delete;

  executor_type get_executor() const noexcept { return executor_; }
  const transfer_plan& plan() const noexcept { return plan_; }
  tracer_type& tracer() noexcept { return tracer_; }
  std::size_t depth() const noexcept { return depth_; }

  /// Pushes version `version`. Completion signature void(std::exception_ptr, update_report):
  /// the exception is a shardline::error whose what() names the parameter (and shard or
  /// receiver) and the cause; with use_awaitable it is thrown. Per-operation cancellation
  /// (any type) stops loading, releases every outstanding write and completes with
  /// asio::error::operation_aborted; the version is not committed.
  template <shard_loader Loader, class Token>
  auto async_update(std::uint32_t version, Loader loader, Token&& token) {
    return asio::co_spawn(executor_, run(version, std::move(loader)), std::forward<Token>(token));
  }

private:
  struct bucket_state {
    std::size_t remaining = 0;  // parameters of this bucket still writing
    std::size_t slot = 0;
  };

  // Everything one update shares between its main coroutine and its write tasks.
  struct update_state {
    explicit update_state(const executor_type& ex, std::uint32_t v) : tasks(ex), version(v) {}
    detail::wait_group tasks;
    std::uint32_t version;
    std::exception_ptr failure;
    bool aborting = false;
    std::list<asio::cancellation_signal> write_signals;
    asio::cancellation_signal loader_signal;
    std::atomic<bool> stop_loading{false};  // read by the loader thread
    asio::cancellation_state cancel_state;
    std::vector<bucket_state> buckets;
    update_report report;
  };

  static std::uint64_t align(std::uint64_t n) { return (n + 4095) / 4096 * 4096; }

  void resolve_regions() {
    regions_.assign(receivers_.size(), {});
    for (std::size_t r = 0; r < receivers_.size(); ++r) {
      const region_table& table = receivers_[r]->remote_regions();
      for (const auto& exposed : plan_.receiver_parameters(r)) {
        const remote_region* region = table.find(exposed.name);
        if (!region)
          throw error(make_error_code(errc::unknown_parameter),
                      "parameter '" + exposed.name + "': receiver " + std::to_string(r) +
                          " does not expose it");
        if (region->length != exposed.bytes())
          throw error(make_error_code(errc::size_mismatch),
                      "parameter '" + exposed.name + "': receiver " + std::to_string(r) +
                          " exposes " + std::to_string(region->length) + " bytes, the plan needs " +
                          std::to_string(exposed.bytes()));
        regions_[r].emplace(exposed.name, region);
      }
    }
  }

  const remote_region& region_of(std::size_t receiver, const std::string& name) const {
    return *regions_[receiver].at(name);
  }

  std::span<std::byte> slot_span(std::size_t slot) const {
    return {staging_.get() + slot * slot_bytes_, slot_bytes_};
  }

  // The first failure wins; it also starts the abort of everything still outstanding.
  void fail(update_state& st, std::exception_ptr e) {
    if (!st.failure) st.failure = std::move(e);
    abort(st);
  }
  void fail(update_state& st, std::error_code ec, const std::string& what) {
    fail(st, std::make_exception_ptr(error(ec, what)));
  }

  void abort(update_state& st) {
    if (st.aborting) return;
    st.aborting = true;
    barrier_.cancel();
    limiter_.cancel();
    slots_.cancel();
    for (auto& s : st.write_signals) s.emit(asio::cancellation_type::terminal);
    st.loader_signal.emit(asio::cancellation_type::terminal);
    st.stop_loading.store(true, std::memory_order_relaxed);
  }

  // An asynchronous loader runs as a task of its own, so that abort() can cancel it even
  // when the failure that aborts comes from elsewhere (a barrier timeout, a write).
  template <class Loader>
  asio::awaitable<void> load_one(update_state& st, Loader& loader, const shard_load& load) {
    detail::wait_group running(executor_);
    std::exception_ptr failure;
    running.add();
    auto on_loaded = [&running, &failure](std::exception_ptr e) {
      failure = e;
      running.done();
    };
    asio::co_spawn(executor_, loader(load),
                   asio::bind_cancellation_slot(st.loader_signal.slot(), std::move(on_loaded)));
    co_await wait_for(st, running);
    if (failure) std::rethrow_exception(failure);
  }

  // Waits for `group` to drain. A cancellation of the update while waiting starts the
  // abort, and the wait goes on: outstanding work is released, never abandoned.
  asio::awaitable<void> wait_for(update_state& st, detail::wait_group& group) {
    while (group.count() > 0) {
      co_await group.wait_once();
      if (cancelled(st.cancel_state) && !st.aborting) {
        fail(st, asio::error::operation_aborted, cancel_message(st.version));
        co_await asio::this_coro::reset_cancellation_state();
        st.cancel_state = co_await asio::this_coro::cancellation_state;
      }
    }
  }

  static std::string describe(std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      return ex.what();
    } catch (...) {
      return "unknown exception";
    }
  }

  static bool cancelled(const asio::cancellation_state& cs) {
    return cs.cancelled() != asio::cancellation_type::none;
  }

  template <class Loader>
  asio::awaitable<update_report> run(std::uint32_t version, Loader loader) {
    if (busy_)
      throw error(make_error_code(errc::invalid_argument),
                  "update of version " + std::to_string(version) +
                      ": another update is still in flight");
    busy_ = true;
    struct busy_reset {
      bool& flag;
      ~busy_reset() { flag = false; }
    } reset_busy{busy_};

    co_await asio::this_coro::throw_if_cancelled(false);
    update_state st(executor_, version);
    st.cancel_state = co_await asio::this_coro::cancellation_state;
    barrier_.reset();
    free_slots_.clear();
    for (std::size_t s = depth_; s-- > 0;) free_slots_.push_back(s);
    st.buckets.resize(plan_.buckets().size());
    // Sized up front: write tasks hold references into it while buckets are added.
    st.report.buckets.resize(plan_.buckets().size());
    std::size_t buckets_started = 0;
    st.report.version = version;
    st.report.start = clock::now();

    for (std::size_t b = 0; b < plan_.buckets().size() && !st.aborting; ++b) {
      const bucket& bk = plan_.buckets()[b];
      auto [slot_ec] = co_await slots_.async_acquire(
          1, 0, asio::experimental::as_tuple(asio::use_awaitable));
      if (cancelled(st.cancel_state))
        fail(st, asio::error::operation_aborted, cancel_message(version));
      if (slot_ec || st.aborting) {
        if (!slot_ec) slots_.release(1, 0);
        break;
      }
      const std::size_t slot = free_slots_.back();
      free_slots_.pop_back();
      st.buckets[b] = {bk.parameters.size(), slot};
      bucket_report& br = st.report.buckets[b];
      ++buckets_started;
      br.index = b;
      br.bytes = bk.staging_bytes;
      br.load_start = clock::now();

      for (const auto& p : bk.parameters) {
        st.tasks.add();
        asio::co_spawn(executor_, write_parameter(st, b, p),
                       [this, &st](std::exception_ptr e) {
                         if (e) fail(st, e);
                         st.tasks.done();
                       });
      }
      co_await load_bucket(st, loader, bk, slot);
      br.load_end = clock::now();
    }

    co_await wait_for(st, st.tasks);
    if (!st.failure && cancelled(st.cancel_state))
      fail(st, asio::error::operation_aborted, cancel_message(version));
    if (!st.failure) co_await commit(st);
    if (st.failure) std::rethrow_exception(st.failure);
    st.report.buckets.resize(buckets_started);
    st.report.end = clock::now();
    co_return std::move(st.report);
  }

  static std::string cancel_message(std::uint32_t version) {
    return "update of version " + std::to_string(version) + " cancelled";
  }

  static shard_load make_load(const planned_parameter& p, const shard_source& shard,
                              std::span<std::byte> staging, std::uint32_t version) {
    return {shard.tensor, p.parameter.destination, shard.index,
            staging.subspan(p.staging_offset + shard.offset, shard.tensor.bytes()), version};
  }

  static error loader_error(const planned_parameter& p, const shard_source& shard,
                            std::exception_ptr failure) {
    return error(make_error_code(errc::loader_failed),
                 "parameter '" + p.parameter.destination.name + "': loader failed on shard " +
                     std::to_string(shard.index) + " ('" + shard.tensor.name +
                     "'): " + describe(failure));
  }

  // Runs on the io_context for every loaded shard, whichever thread loaded it.
  void shard_loaded(update_state& st, const planned_parameter& p, const shard_source& shard,
                    clock::time_point started, clock::time_point ended) {
    tracer_.span(trace_track::loader, "load", shard.tensor.name, started, ended);
    if (st.aborting) return;
    std::error_code ec;
    barrier_.arrive(p.parameter.destination.name, shard.index, ec);
    if (ec)
      fail(st, ec, "parameter '" + p.parameter.destination.name + "': shard " +
                       std::to_string(shard.index) + ": " + ec.message());
  }

  template <class Loader>
  asio::awaitable<void> load_bucket(update_state& st, Loader& loader, const bucket& bk,
                                    std::size_t slot) {
    const std::span<std::byte> staging = slot_span(slot);
    constexpr bool asynchronous =
        std::is_same_v<std::invoke_result_t<Loader&, const shard_load&>, asio::awaitable<void>>;
    if constexpr (!asynchronous) {
      if (loader_pool_) {
        // The whole bucket in one trip to the loader thread, which keeps loading while the
        // io_context handles each shard's arrival: no round trip per shard.
        const std::uint32_t version = st.version;
        auto load_all = [this, &st, &loader, &bk, staging, version] {
          for (const auto& p : bk.parameters)
            for (const auto& shard : p.parameter.shards) {
              if (st.stop_loading.load(std::memory_order_relaxed)) return;
              const auto started = clock::now();
              try {
                loader(make_load(p, shard, staging, version));
              } catch (...) {
                throw loader_error(p, shard, std::current_exception());
              }
              asio::post(executor_, [this, &st, &p, &shard, started, ended = clock::now()] {
                shard_loaded(st, p, shard, started, ended);
              });
            }
        };
        try {
          co_await detail::async_run_on(loader_pool_->get_executor(), executor_, load_all,
                                        asio::use_awaitable);
        } catch (...) {
          fail(st, std::current_exception());
        }
        if (cancelled(st.cancel_state))
          fail(st, asio::error::operation_aborted, cancel_message(st.version));
        co_return;
      }
    }
    for (const auto& p : bk.parameters) {
      for (const auto& shard : p.parameter.shards) {
        if (st.aborting) co_return;
        const shard_load load = make_load(p, shard, staging, st.version);
        const auto started = clock::now();
        std::exception_ptr failure;
        try {
          if constexpr (asynchronous)
            co_await load_one(st, loader, load);
          else
            loader(load);
        } catch (...) {
          failure = std::current_exception();
        }
        if (failure) {
          fail(st, std::make_exception_ptr(loader_error(p, shard, failure)));
          co_return;
        }
        if (cancelled(st.cancel_state)) {
          fail(st, asio::error::operation_aborted, cancel_message(st.version));
          co_return;
        }
        shard_loaded(st, p, shard, started, clock::now());
      }
    }
  }

  // Waits for the parameter's shards, writes it to every receiver, and hands the bucket's
  // staging slot back once the bucket's last parameter is done. Never throws: failures go
  // to fail(), so the slot bookkeeping below always runs.
  asio::awaitable<void> write_parameter(update_state& st, std::size_t b,
                                        const planned_parameter& p) {
    const std::string& name = p.parameter.destination.name;
    const auto waited_from = clock::now();
    // abort() cancels the waits it finds; one that starts after it must not begin at all.
    std::error_code ec = asio::error::operation_aborted;
    if (!st.aborting)
      std::tie(ec) = co_await barrier_.async_wait(
          name, options_.shard_timeout, asio::experimental::as_tuple(asio::use_awaitable));
    tracer_.span(trace_track::barrier, "barrier", name, waited_from, clock::now());
    if (ec == errc::shard_timeout)
      fail(st, ec, barrier_.describe_missing(name) + " after " +
                       std::to_string(options_.shard_timeout.count()) + " ms");
    else if (ec && !st.aborting)
      fail(st, ec, "parameter '" + name + "': " + ec.message());
    else if (!ec && !st.aborting)
      co_await write_to_receivers(st, b, p);

    if (--st.buckets[b].remaining == 0) {
      auto& br = st.report.buckets[b];
      br.transfer_end = clock::now();
      if (br.transfer_start == clock::time_point{}) br.transfer_start = br.transfer_end;
      free_slots_.push_back(st.buckets[b].slot);
      slots_.release(1, 0);
    }
  }

  asio::awaitable<void> write_to_receivers(update_state& st, std::size_t b,
                                           const planned_parameter& p) {
    const std::string& name = p.parameter.destination.name;
    const std::span<std::byte> staging = slot_span(st.buckets[b].slot);
    const local_region local = registration_.region();

    std::vector<std::vector<write_request>> batches(receivers_.size());
    std::uint64_t bytes = 0;
    for (const auto& w : p.writes) {
      batches[w.receiver].push_back(make_write(
          local, staging.subspan(p.staging_offset + w.staging_offset, w.bytes),
          region_of(w.receiver, name), w.destination_offset));
      bytes += w.bytes;
    }
    const std::size_t operations = static_cast<std::size_t>(
        std::count_if(batches.begin(), batches.end(), [](const auto& v) { return !v.empty(); }));

    if (st.aborting) co_return;
    auto [acquire_ec] = co_await limiter_.async_acquire(
        operations, bytes, asio::experimental::as_tuple(asio::use_awaitable));
    if (acquire_ec || st.aborting) {
      if (!acquire_ec) {
        limiter_.release(operations, bytes);
        co_return;
      }
      if (!st.aborting)
        fail(st, acquire_ec,
             "parameter '" + name + "': needs " + std::to_string(operations) + " writes and " +
                 std::to_string(bytes) + " bytes in flight, the limits are " +
                 std::to_string(limiter_.limits().max_operations) + " writes and " +
                 std::to_string(limiter_.limits().max_bytes) + " bytes");
      co_return;
    }
    auto& br = st.report.buckets[b];
    const auto started = clock::now();
    if (br.transfer_start == clock::time_point{}) br.transfer_start = started;

    detail::wait_group pending(executor_);
    std::error_code first_error;
    std::size_t failed_receiver = 0;
    for (std::size_t r = 0; r < batches.size(); ++r) {
      if (batches[r].empty()) continue;
      pending.add();
      auto& signal = st.write_signals.emplace_back();
      auto on_written = [&pending, &first_error, &failed_receiver, r](std::error_code e) {
        if (e && !first_error) {
          first_error = e;
          failed_receiver = r;
        }
        pending.done();
      };
      receivers_[r]->async_write(batches[r],
                                 asio::bind_cancellation_slot(signal.slot(), std::move(on_written)));
    }
    // A write task is not the update's coroutine: it waits plainly, and abort() reaches
    // its writes through their cancellation signals.
    while (pending.count() > 0) co_await pending.wait_once();
    limiter_.release(operations, bytes);
    st.report.wire_bytes += bytes;
    tracer_.span(trace_track::write, "write", name, started, clock::now());

    if (first_error && !(st.aborting && first_error == asio::error::operation_aborted))
      fail(st, first_error,
           "parameter '" + name + "': write to receiver " + std::to_string(failed_receiver) +
               " failed: " + first_error.message());
  }

  // Every byte of every receiver has landed: now, and only now, announce the version.
  asio::awaitable<void> commit(update_state& st) {
    const auto started = clock::now();
    detail::wait_group pending(executor_);
    std::error_code first_error;
    std::size_t failed_receiver = 0;
    for (std::size_t r = 0; r < receivers_.size(); ++r) {
      pending.add();
      receivers_[r]->async_write_notify(
          std::span<const write_request>{}, st.version,
          [&pending, &first_error, &failed_receiver, r](std::error_code e) {
            if (e && !first_error) {
              first_error = e;
              failed_receiver = r;
            }
            pending.done();
          });
    }
    while (pending.count() > 0) co_await pending.wait_once();
    tracer_.span(trace_track::commit, "commit", "version " + std::to_string(st.version), started,
                 clock::now());
    if (first_error)
      fail(st, first_error,
           "commit of version " + std::to_string(st.version) + " to receiver " +
               std::to_string(failed_receiver) + " failed: " + first_error.message());
  }

  executor_type executor_;
  transfer_plan plan_;
  std::vector<connection_type*> receivers_;
  pipeline_options options_;
  std::size_t depth_;
  std::uint64_t slot_bytes_;
  std::unique_ptr<std::byte[]> staging_;
  typename Transport::registration registration_;
  std::vector<std::unordered_map<std::string, const remote_region*>> regions_;
  basic_shard_barrier<executor_type> barrier_;
  basic_inflight_limiter<executor_type> limiter_;
  basic_inflight_limiter<executor_type> slots_;
  std::vector<std::size_t> free_slots_;
  std::optional<asio::thread_pool> loader_pool_;
  [[no_unique_address]] tracer_type tracer_;
  bool busy_ = false;
};

}  // namespace shardline
