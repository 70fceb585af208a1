// shardline/pipeline.hpp: one weight version pushed from one sender to its receivers as
// an awaitable pipeline of buckets: begin -> (per bucket: load shards, write every parameter
// whose shards are in) -> commit, each notice acknowledged by every receiver.
#pragma once

#include <shardline/async/detail/run_on.hpp>
#include <shardline/async/detail/task_group.hpp>
#include <shardline/error.hpp>
#include <shardline/async/inflight_limiter.hpp>
#include <shardline/memory.hpp>
#include <shardline/staging.hpp>
#include <shardline/trace.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/transport/concepts.hpp>

#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace shardline {

/// What the user's loader is asked to do: fill `staging` (exactly tensor.bytes() bytes, in
/// memory of kind `location`) with source tensor `tensor`, already converted to the
/// destination dtype.
struct shard_load {
  const parameter_descriptor& tensor;
  const parameter_descriptor& destination;
  std::size_t shard_index;
  std::span<std::byte> staging;
  memory_location location;
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

/// Compile-time configuration. `Tracer` = no_tracer compiles every trace call away;
/// `Staging` (a staging_policy) decides where loaded bytes wait for the wire.
template <std::size_t Depth = 2, class Tracer = no_tracer, std::size_t MaxOperations = 64,
          std::uint64_t MaxBytes = (std::uint64_t(1) << 30), class Staging = host_staging>
struct pipeline_config {
  static_assert(Depth >= 1, "a pipeline needs at least one staging slot");
  static_assert(staging_policy<Staging>, "Staging must model shardline::staging_policy");
  static constexpr std::size_t depth = Depth;
  static constexpr inflight_limits limits{MaxOperations, MaxBytes};
  using tracer_type = Tracer;
  using staging_type = Staging;
};

/// Runtime overrides of the configuration.
struct pipeline_options {
  std::size_t depth = 0;                       ///< buckets in flight; 0: the config's
  std::optional<inflight_limits> limits;       ///< outstanding write batches and bytes
  /// Longest an asynchronous loader may take for one shard before the update fails with
  /// errc::shard_timeout (a void loader runs on a thread and cannot be interrupted).
  std::chrono::milliseconds shard_timeout{30000};
  std::size_t loader_threads = 1;              ///< threads for void loaders; 0: on the io_context
  /// Longest the update waits for the receivers to acknowledge one notice (begin, commit,
  /// abort, withdraw) before it fails with errc::ack_timeout naming the receiver: a receiver
  /// that is alive but never reads its notices must not hang the trainer. Must be positive;
  /// std::chrono::milliseconds::max() waits without a bound.
  std::chrono::milliseconds ack_timeout{30000};
};

struct bucket_report {
  using clock = std::chrono::steady_clock;
  std::size_t index = 0;
  std::uint64_t bytes = 0;  ///< staging bytes
  clock::time_point load_start{}, load_end{}, transfer_start{}, transfer_end{};
  clock::duration load_time() const { return load_end - load_start; }
  clock::duration transfer_time() const { return transfer_end - transfer_start; }
};

struct update_report {
  using clock = std::chrono::steady_clock;
  std::uint32_t version = 0;
  std::uint32_t sender = 0;
  std::uint64_t bytes = 0;       ///< staging bytes loaded
  std::uint64_t wire_bytes = 0;  ///< bytes written, summed over receivers
  clock::time_point start{}, end{};
  std::vector<bucket_report> buckets;
  /// The receivers that acknowledged this sender's commit of `version`: they hold every byte
  /// this sender sends them (a receiver announces the version once all its senders did).
  std::vector<std::size_t> committed;

  clock::duration elapsed() const { return end - start; }
  /// Sum of the buckets' load times.
  clock::duration total_load() const {
    clock::duration d{};
    for (const auto& b : buckets) d += b.load_time();
    return d;
  }
  /// Time at least one bucket was loading: the union of the load intervals.
  clock::duration load_busy() const { return busy(&bucket_report::load_start, &bucket_report::load_end); }
  /// Time the transport was busy: the union of the buckets' transfer intervals (they
  /// overlap when several buckets are in flight, so a plain sum would count twice).
  clock::duration transfer_busy() const {
    return busy(&bucket_report::transfer_start, &bucket_report::transfer_end);
  }
  /// A true lower bound of the makespan: no schedule finishes before the loader, or the
  /// link, has been busy as long as it was in this run, and both unions lie inside
  /// [start, end]. So overlap_efficiency() never exceeds 1.
  clock::duration lower_bound() const { return std::max(load_busy(), transfer_busy()); }
  /// lower_bound / makespan: 1.0 when the busier stage never waited for the other.
  double overlap_efficiency() const {
    const double actual = std::chrono::duration<double>(elapsed()).count();
    return actual > 0 ? std::chrono::duration<double>(lower_bound()).count() / actual : 0.0;
  }

private:
  clock::duration busy(clock::time_point bucket_report::*from, clock::time_point bucket_report::*to) const {
    std::vector<std::pair<clock::time_point, clock::time_point>> spans;
    spans.reserve(buckets.size());
    for (const auto& b : buckets)
      if (b.*to > b.*from) spans.emplace_back(b.*from, b.*to);
    std::sort(spans.begin(), spans.end());
    clock::duration d{};
    clock::time_point covered{};
    for (const auto& [f, t] : spans) {
      const auto s = std::max(f, covered);
      if (t > s) d += t - s;
      covered = std::max(covered, t);
    }
    return d;
  }
};

/// Pushes weight versions from one sender through `Transport` to the receivers of a
/// transfer_plan (the whole plan for a single sender, or plan.for_sender(s)).
///
/// async_update runs one version: a begin notice to every receiver, then for each bucket
/// (at most `depth` in flight, each owning a staging slot until its writes complete) the
/// loader fills every shard of the sender and each parameter is written to all its
/// receivers as soon as its shards are in; contiguous writes to contiguous receiver memory
/// go as one. Once every write completed, each receiver gets the commit notice and the
/// update succeeds only when every receiver acknowledged it. On any error or cancellation
/// no receiver gets a commit: they get an abort (or a withdraw when nothing was written),
/// and the connections stay usable for the next version.
///
/// Thread safety: one update at a time; use from the transport's executor, run by one thread.
template <transport Transport, class Config = pipeline_config<>>
class update_pipeline {
public:
  using executor_type = typename Transport::executor_type;
  using connection_type = typename Transport::connection;
  using tracer_type = typename Config::tracer_type;
  using staging_type = typename Config::staging_type;
  using clock = std::chrono::steady_clock;

  /// `receivers[r]` is the connection to the plan's receiver r, or nullptr for a receiver
  /// that is not attached (see attach_receiver). Throws shardline::error naming the cause:
  /// errc::invalid_argument when the plan has several senders and is not a sender's plan,
  /// the receiver count differs from the plan's, or options.ack_timeout is not positive;
  /// errc::unsupported_memory when the staging memory or a receiver's region is of a kind the
  /// transport cannot move; and what attach_receiver throws for each receiver.
  update_pipeline(Transport& transport, transfer_plan plan, std::vector<connection_type*> receivers,
                  pipeline_options options = {}, staging_type staging = {})
      : executor_(transport.get_executor()),
        plan_(std::move(plan)),
        options_(options),
        depth_(options.depth ? options.depth : Config::depth),
        slot_bytes_(align(std::max<std::uint64_t>(plan_.max_staging_bytes(), 1))),
        staging_(std::move(staging)),
        block_(staging_.allocate(static_cast<std::size_t>(slot_bytes_ * depth_), 4096)),
        registration_(register_staging(transport)),
        limiter_(executor_, options.limits.value_or(Config::limits)),
        slots_(executor_, inflight_limits{depth_, 0}),
        scratch_(depth_) {
    if (plan_.senders() > 1 && !plan_.sender())
      throw error(make_error_code(errc::invalid_argument),
                  "update_pipeline: the plan has " + std::to_string(plan_.senders()) +
                      " senders: give each sender's pipeline plan.for_sender(s)");
    if (options_.ack_timeout <= std::chrono::milliseconds::zero())
      throw error(make_error_code(errc::invalid_argument),
                  "update_pipeline: ack_timeout is " + std::to_string(options_.ack_timeout.count()) +
                      " ms: it must be positive (milliseconds::max() waits without a bound)");
    if (receivers.size() != plan_.receivers())
      throw error(make_error_code(errc::invalid_argument),
                  "update_pipeline: the plan has " + std::to_string(plan_.receivers()) +
                      " receivers but " + std::to_string(receivers.size()) + " connections were given");
    std::size_t first = 0;
    for (const auto& b : plan_.buckets()) {
      bucket_first_.push_back(first);
      first += b.parameters.size();
    }
    parameter_count_ = first;
    receivers_.assign(receivers.size(), nullptr);
    targets_.resize(receivers.size());
    writes_to_.assign(receivers.size(), false);
    for (std::size_t r = 0; r < receivers.size(); ++r)
      if (receivers[r]) attach_receiver(r, *receivers[r]);
    for (auto& s : scratch_) s.batches.resize(receivers_.size());
    for (std::size_t s = depth_; s-- > 0;) free_slots_.push_back(s);
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
  /// This pipeline's sender id (0 for a single-sender plan).
  std::uint32_t sender() const noexcept { return static_cast<std::uint32_t>(plan_.sender().value_or(0)); }
  /// Where the loader's staging memory lives.
  memory_location staging_location() const noexcept { return block_.location(); }
  /// The report of the last update that ran, failed ones included (`committed` then says
  /// which receivers acknowledged the commit before the failure).
  const update_report& last_report() const noexcept { return last_report_; }

  /// Whether receiver `r` has a connection: later updates write only to attached receivers.
  bool attached(std::size_t r) const noexcept { return r < receivers_.size() && receivers_[r]; }

  /// Attaches `connection` as receiver `r` (a new rollout engine, or one reconnected after a
  /// restart): it gets the whole of the next version. Checks, in time linear in the
  /// parameters, that it exposes every planned parameter it receives: throws
  /// shardline::error naming the parameter, the receiver and both sides:
  /// errc::unknown_parameter (not exposed), errc::size_mismatch (another byte count),
  /// errc::layout_mismatch (same bytes, another dtype or shape), errc::unsupported_memory
  /// (a kind the transport cannot write); errc::invalid_argument when `r` is out of range or
  /// an update is running. Nothing changes when it throws.
  void attach_receiver(std::size_t r, connection_type& connection) {
    check_idle("attach_receiver");
    check_receiver(r);
    targets_[r] = resolve(r, connection.remote_regions());
    receivers_[r] = &connection;
    writes_to_[r] = std::any_of(targets_[r].begin(), targets_[r].end(), [](auto* t) { return t != nullptr; });
  }

  /// Detaches receiver `r` (dead, or scaled away): later updates skip it. Throws
  /// shardline::error(errc::invalid_argument) when `r` is out of range or an update runs.
  void drop_receiver(std::size_t r) {
    check_idle("drop_receiver");
    check_receiver(r);
    receivers_[r] = nullptr;
    targets_[r].clear();
    writes_to_[r] = false;
  }

  /// Pushes version `version`. Completion signature void(std::exception_ptr, update_report):
  /// the exception is a shardline::error whose what() names the parameter (and shard or
  /// receiver) and the cause; with use_awaitable it is thrown. A failed update leaves every
  /// connection usable: writes already posted finish, nothing new is posted.
  ///
  /// A receiver that does not acknowledge a notice within options.ack_timeout fails the
  /// update with errc::ack_timeout naming it and the notice; the notice's operation is
  /// cancelled (per-operation, terminal) and not waited for: a transport that cannot recall
  /// it may still deliver it later, so a commit that timed out may yet be announced there.
  /// Receivers that timed out get the abort or withdraw that follows a failure without being
  /// waited for again.
  ///
  /// Per-operation cancellation, completing with asio::error::operation_aborted and no
  /// commit anywhere:
  ///  - terminal: stops now: no load and no write starts after it (a load running on a
  ///    thread finishes; an asynchronous loader is cancelled);
  ///  - partial: buckets already started finish their loads and writes, no new bucket starts;
  ///  - total: honoured only while no write has been posted (the receivers' memory is
  ///    untouched and they get a withdraw); after that it is ignored and the update goes on.
  /// Once the commit is being sent, cancellation is ignored.
  template <shard_loader Loader, class Token>
  auto async_update(std::uint32_t version, Loader loader, Token&& token) {
    return asio::co_spawn(executor_, run(version, std::move(loader)), std::forward<Token>(token));
  }

private:
  enum class stop_kind { none, after_started, now };

  // One bucket in flight. Lives in its coroutine's frame; the loader thread touches only
  // the atomics.
  struct bucket_run {
    explicit bucket_run(const executor_type& ex) : bell(ex) {}
    detail::doorbell<executor_type> bell;
    std::atomic<std::size_t> loaded{0};  // parameters whose every shard is in, in plan order
    std::atomic<bool> wake_posted{false};
    bool loads_done = false;
    std::exception_ptr load_failure;
    std::size_t written = 0;      // parameters whose writes are posted (or skipped)
    std::size_t outstanding = 0;  // write batches in flight
    asio::cancellation_signal* active_load = nullptr;  // an asynchronous loader's, to cancel it
  };

  // Everything one update shares between its coroutine and its bucket tasks.
  struct update_state {
    update_state(const executor_type& ex, std::uint32_t v) : tasks(ex), version(v) {}
    detail::task_group<executor_type> tasks;
    std::uint32_t version;
    std::exception_ptr failure;
    stop_kind stop = stop_kind::none;
    std::atomic<bool> stop_loads{false};  // read by the loader thread
    std::size_t writes_posted = 0;
    std::vector<bucket_run*> running;
    update_report report;
    std::vector<bool> unresponsive;  // [receiver]: a notice of this update timed out there
  };

  // A bucket's claim on a staging slot, given back when the bucket's last write completed.
  class staging_slot {
  public:
    staging_slot(update_pipeline* owner, std::size_t index) noexcept : owner_(owner), index_(index) {}
    staging_slot(staging_slot&& o) noexcept : owner_(std::exchange(o.owner_, nullptr)), index_(o.index_) {}
    staging_slot& operator=(staging_slot&&) = delete;
    ~staging_slot() {
      if (!owner_) return;
      owner_->free_slots_.push_back(index_);
      owner_->slots_.release(1, 0);
    }
    std::size_t index() const noexcept { return index_; }

  private:
    update_pipeline* owner_;
    std::size_t index_;
  };

  // Per staging slot, reused from version to version: no allocation per parameter.
  struct slot_scratch {
    std::vector<std::vector<write_request>> batches;  // per receiver
  };

  static std::uint64_t align(std::uint64_t n) { return (n + 4095) / 4096 * 4096; }

  typename Transport::registration register_staging(Transport& transport) {
    // A transport configured to read more than its static source_kinds (verbs with dma-buf
    // registration) says so at run time.
    if constexpr (requires { transport.readable_kinds(); })
      require_kind(transport.readable_kinds(), block_.location(), "the transport", "the staging memory");
    else
      require_kind(Transport::source_kinds, block_.location(), "the transport", "the staging memory");
    return transport.register_memory(block_.bytes(), block_.location());
  }

  void check_idle(const char* what) const {
    if (busy_)
      throw error(make_error_code(errc::invalid_argument),
                  std::string("update_pipeline: ") + what + " while an update is running");
  }
  void check_receiver(std::size_t r) const {
    if (r >= receivers_.size())
      throw error(make_error_code(errc::invalid_argument),
                  "update_pipeline: receiver " + std::to_string(r) + " does not exist (the plan has " +
                      std::to_string(receivers_.size()) + " receivers)");
  }

  // What the transport writes in a receiver's memory: destination_kinds, or, where a receiver
  // may expose more than that (verbs: cuda_device registered through dma-buf), whatever kind
  // a receiver put in its table.
  static constexpr memory_kinds remote_kinds() noexcept {
    if constexpr (requires { Transport::exposed_kinds; })
      return Transport::exposed_kinds;
    else
      return Transport::destination_kinds;
  }

  // The receiver's region of every parameter this sender writes to it, by plan position.
  std::vector<const remote_region*> resolve(std::size_t r, const region_table& table) const {
    std::vector<const remote_region*> out(parameter_count_, nullptr);
    std::size_t pos = 0;
    for (const auto& b : plan_.buckets())
      for (const auto& p : b.parameters) {
        const std::size_t at = pos++;
        const bool written = std::any_of(p.writes.begin(), p.writes.end(),
                                         [r](const planned_write& w) { return w.receiver == r; });
        if (!written) continue;
        const std::string& name = p.slice.name;
        // Messages are built only on failure: this runs for every parameter of every receiver.
        const auto who = [&] { return "parameter '" + name + "': receiver " + std::to_string(r); };
        const remote_region* region = table.find(name);
        if (!region)
          throw error(make_error_code(errc::unknown_parameter), who() + " does not expose it");
        if (region->length != p.slice.bytes())
          throw error(make_error_code(errc::size_mismatch),
                      who() + " exposes " + std::to_string(region->length) + " bytes, the plan needs " +
                          std::to_string(p.slice.bytes()) + " (" + describe(p.slice) + ")");
        if (region->layout && (region->layout->type != p.slice.type || region->layout->shape != p.slice.shape)) {
          const tensor_layout planned{p.slice.type, p.slice.shape};
          throw error(make_error_code(errc::layout_mismatch),
                      who() + " holds " + to_string(*region->layout) + ", the plan sends " +
                          to_string(planned) + " (same " + std::to_string(region->length) + " bytes)");
        }
        if (!remote_kinds().contains(region->location.kind))
          require_kind(remote_kinds(), region->location, "the transport", who() + "'s memory");
        out[at] = region;
      }
    return out;
  }

  static std::string describe_failure(std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      return ex.what();
    } catch (...) {
      return "unknown exception";
    }
  }

  // The first failure wins; it also stops everything still running.
  void fail(update_state& u, std::exception_ptr e) {
    if (!u.failure) u.failure = std::move(e);
    stop(u, stop_kind::now);
  }
  void fail(update_state& u, std::error_code ec, const std::string& what) {
    fail(u, std::make_exception_ptr(error(ec, what)));
  }

  void stop(update_state& u, stop_kind how) {
    if (how <= u.stop) return;
    u.stop = how;
    if (how != stop_kind::now) return;
    u.stop_loads.store(true, std::memory_order_relaxed);
    limiter_.cancel();
    for (bucket_run* b : u.running) {
      if (b->active_load) b->active_load->emit(asio::cancellation_type::terminal);
      b->bell.ring();
    }
  }

  // Applies a cancellation the update's coroutine has seen, then listens again.
  asio::awaitable<void, executor_type> take_cancellation(update_state& u) {
    const asio::cancellation_state state = co_await asio::this_coro::cancellation_state;
    const asio::cancellation_type type = state.cancelled();
    if (type == asio::cancellation_type::none) co_return;
    const auto has = [type](asio::cancellation_type t) { return (type & t) != asio::cancellation_type::none; };
    const std::string v = "update of version " + std::to_string(u.version) + " cancelled";
    if (has(asio::cancellation_type::terminal)) {
      fail(u, asio::error::operation_aborted, v + " (terminal)");
    } else if (has(asio::cancellation_type::partial)) {
      if (!u.failure) u.failure = std::make_exception_ptr(error(asio::error::operation_aborted, v + " (partial)"));
      stop(u, stop_kind::after_started);
    } else if (has(asio::cancellation_type::total) && u.writes_posted == 0) {
      fail(u, asio::error::operation_aborted, v + " (total, before any write)");
    }
    co_await asio::this_coro::reset_cancellation_state(asio::enable_total_cancellation());
  }

  // A free staging slot, or none once the update stops. A cancellation may arrive while we
  // wait, or while we run (a loader started inline by a spawn can emit it): look each time.
  asio::awaitable<std::optional<staging_slot>, executor_type> acquire_slot(update_state& u) {
    while (true) {
      co_await take_cancellation(u);
      if (u.stop != stop_kind::none) co_return std::nullopt;
      auto [ec] = co_await slots_.async_acquire(
          1, 0, asio::experimental::as_tuple(asio::use_awaitable_t<executor_type>{}));
      if (ec) continue;
      staging_slot slot(this, free_slots_.back());
      free_slots_.pop_back();
      co_await take_cancellation(u);
      if (u.stop != stop_kind::none) co_return std::nullopt;  // the slot goes back at once
      co_return std::optional<staging_slot>(std::move(slot));
    }
  }

  // What one announce shares with its notify completions, which may outlive it: after a
  // timeout the announce returns without them (a transport may never complete a notice it
  // cannot recall), so they reach the announce only through `bell` while it waits.
  struct acknowledgements {
    explicit acknowledgements(std::size_t receivers) : cancel(new asio::cancellation_signal[receivers]), waiting(receivers) {}
    std::unique_ptr<asio::cancellation_signal[]> cancel;  // [receiver]: its notify's
    std::vector<char> waiting;                            // [receiver]: not yet acknowledged
    std::size_t pending = 0;
    bool timed_out = false;
    std::vector<std::size_t> acked;
    std::optional<std::pair<std::size_t, std::error_code>> failed;
    detail::doorbell<executor_type>* bell = nullptr;  // null once the announce stopped waiting
  };

  struct acknowledged {
    std::shared_ptr<acknowledgements> acks;
    std::size_t receiver;
    void operator()(std::error_code ec) const {
      auto& a = *acks;
      if (!a.bell) return;  // the announce gave up on it (timeout): nothing to report
      a.waiting[receiver] = false;
      if (!ec) a.acked.push_back(receiver);
      else if (!a.failed) a.failed.emplace(receiver, ec);
      if (--a.pending == 0) a.bell->ring();
    }
  };

  // Sends `kind` to every attached receiver this sender writes to (the others do not count
  // it among their senders) and waits for every acknowledgement, at most options.ack_timeout.
  // Returns the receivers that acknowledged; `failed` gets the first failure (receiver,
  // code), errc::ack_timeout for the first receiver still silent when the time is up.
  // Receivers marked unresponsive get the notice but are not waited for.
  asio::awaitable<std::vector<std::size_t>, executor_type> announce(
      update_state& u, notice_kind kind, std::optional<std::pair<std::size_t, std::error_code>>& failed,
      bool cancellable) {
    detail::doorbell<executor_type> bell(executor_);
    auto acks = std::make_shared<acknowledgements>(receivers_.size());
    acks->bell = &bell;
    for (std::size_t r = 0; r < receivers_.size(); ++r) {
      if (!receivers_[r] || !writes_to_[r]) continue;
      if (u.unresponsive[r]) {
        receivers_[r]->async_notify(kind, u.version, [](std::error_code) {});
        continue;
      }
      ++acks->pending;
      acks->waiting[r] = true;
      receivers_[r]->async_notify(kind, u.version,
                                  asio::bind_cancellation_slot(acks->cancel[r].slot(), acknowledged{acks, r}));
    }
    asio::steady_timer timer(executor_);
    if (acks->pending > 0 && options_.ack_timeout != std::chrono::milliseconds::max()) {
      timer.expires_after(options_.ack_timeout);
      timer.async_wait([acks](std::error_code ec) {
        if (ec || !acks->bell) return;
        acks->timed_out = true;
        acks->bell->ring();
      });
    }
    while (acks->pending > 0 && !acks->timed_out) {
      co_await bell.wait();
      if (cancellable) co_await take_cancellation(u);
      else co_await asio::this_coro::reset_cancellation_state(asio::enable_total_cancellation());
    }
    timer.cancel();
    // From here on a completion reports nothing: it may come during the cancellation below.
    acks->bell = nullptr;
    std::optional<std::pair<std::size_t, std::error_code>> silent;
    for (std::size_t r = 0; r < receivers_.size(); ++r) {
      if (!acks->waiting[r]) continue;
      u.unresponsive[r] = true;
      if (!silent) silent.emplace(r, make_error_code(errc::ack_timeout));
      acks->cancel[r].emit(asio::cancellation_type::terminal);
    }
    if (!failed) failed = acks->failed ? acks->failed : silent;
    std::sort(acks->acked.begin(), acks->acked.end());
    co_return std::move(acks->acked);
  }

  // "begin of version 3: receiver 1: peer disconnected", or for a timeout "receiver 1 did not
  // acknowledge the commit of version 3 within 30 s".
  std::string notice_failure(notice_kind kind, std::uint32_t version,
                             const std::pair<std::size_t, std::error_code>& failed) const {
    const std::string notice = std::string(to_string(kind)) + " of version " + std::to_string(version);
    const std::string receiver = "receiver " + std::to_string(failed.first);
    if (failed.second != errc::ack_timeout) return notice + ": " + receiver + ": " + failed.second.message();
    const auto ms = options_.ack_timeout.count();
    const std::string limit = ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms";
    return receiver + " did not acknowledge the " + notice + " within " + limit;
  }

  template <class Loader>
  asio::awaitable<update_report, executor_type> run(std::uint32_t version, Loader loader) {
    if (busy_)
      throw error(make_error_code(errc::invalid_argument),
                  "update of version " + std::to_string(version) + ": another update is still in flight");
    busy_ = true;
    struct busy_reset {
      bool& flag;
      ~busy_reset() { flag = false; }
    } reset_busy{busy_};

    co_await asio::this_coro::throw_if_cancelled(false);
    co_await asio::this_coro::reset_cancellation_state(asio::enable_total_cancellation());
    update_state u(executor_, version);
    u.unresponsive.assign(receivers_.size(), false);
    u.report.version = version;
    u.report.sender = sender();
    u.report.start = clock::now();
    u.report.buckets.resize(plan_.buckets().size());
    last_report_ = {};

    std::optional<std::pair<std::size_t, std::error_code>> failed;
    co_await announce(u, notice_kind::begin, failed, true);
    if (failed) fail(u, failed->second, notice_failure(notice_kind::begin, version, *failed));

    std::size_t started = 0;
    for (std::size_t b = 0; b < plan_.buckets().size() && u.stop == stop_kind::none; ++b) {
      auto slot = co_await acquire_slot(u);
      if (!slot) break;
      ++started;
      u.tasks.spawn(run_bucket(u, b, std::move(*slot), loader));
    }
    while (u.tasks.running() > 0) {
      co_await u.tasks.join_once();
      co_await take_cancellation(u);
    }
    if (u.tasks.failed() && !u.failure) u.failure = u.tasks.failure();
    u.report.buckets.resize(started);

    if (u.failure) {
      std::optional<std::pair<std::size_t, std::error_code>> ignored;
      co_await announce(u, u.writes_posted ? notice_kind::abort : notice_kind::withdraw, ignored, false);
      u.report.end = clock::now();
      last_report_ = std::move(u.report);
      std::rethrow_exception(u.failure);
    }

    const auto commit_start = clock::now();
    u.report.committed = co_await announce(u, notice_kind::commit, failed, false);
    tracer_.span(trace_track::commit, "commit", "version " + std::to_string(version), commit_start,
                 clock::now());
    u.report.end = clock::now();
    last_report_ = u.report;
    if (failed) {
      std::string holders;
      for (auto r : u.report.committed) holders += (holders.empty() ? "" : ", ") + std::to_string(r);
      throw error(failed->second, notice_failure(notice_kind::commit, version, *failed) +
                                      " (acknowledged by: " + (holders.empty() ? "none" : holders) + ")");
    }
    co_return std::move(u.report);
  }

  static error loader_error(const planned_parameter& p, const shard_source& shard, std::exception_ptr failure) {
    return error(make_error_code(errc::loader_failed),
                 "parameter '" + p.parameter.destination.name + "': loader failed on shard " +
                     std::to_string(shard.index) + " ('" + shard.tensor.name + "'): " + describe_failure(failure));
  }

  shard_load make_load(const planned_parameter& p, const shard_source& shard, std::span<std::byte> staging,
                       std::uint32_t version) const {
    return {shard.tensor, p.parameter.destination, shard.index,
            staging.subspan(p.staging_offset + shard.offset, shard.tensor.bytes()), block_.location(), version};
  }

  std::span<std::byte> slot_span(std::size_t slot) const {
    return block_.bytes().subspan(static_cast<std::size_t>(slot * slot_bytes_), static_cast<std::size_t>(slot_bytes_));
  }

  // Wakes the bucket from the loader thread; at most one wake-up is ever in the queue.
  void wake_from_thread(bucket_run& br) {
    if (br.wake_posted.exchange(true, std::memory_order_acq_rel)) return;
    asio::post(executor_, [&br] {
      br.wake_posted.store(false, std::memory_order_release);
      br.bell.ring();
    });
  }

  // A bucket, top to bottom: start its loads, then, until every load is done and every write
  // completed, post the writes of the parameters whose shards are all in. The slot goes back
  // when this returns.
  template <class Loader>
  asio::awaitable<void, executor_type> run_bucket(update_state& u, std::size_t b, staging_slot slot,
                                                  Loader& loader) {
    const bucket& bk = plan_.buckets()[b];
    bucket_report& report = u.report.buckets[b];
    report.index = b;
    report.bytes = bk.staging_bytes;
    u.report.bytes += bk.staging_bytes;
    bucket_run br(executor_);
    u.running.push_back(&br);
    const std::span<std::byte> staging = slot_span(slot.index());
    report.load_start = clock::now();
    start_loads(u, br, bk, staging, loader);

    while (true) {
      if (br.load_failure) fail(u, std::exchange(br.load_failure, nullptr));
      const std::size_t ready = br.loaded.load(std::memory_order_acquire);
      if (ready > br.written) {
        if (u.stop != stop_kind::now) co_await write_ready(u, br, b, scratch_[slot.index()], staging, ready);
        br.written = ready;
        continue;
      }
      const bool all_written = br.written == bk.parameters.size() || u.stop == stop_kind::now;
      if (br.loads_done && br.outstanding == 0 && all_written) break;
      co_await br.bell.wait();
    }
    if (report.transfer_start == clock::time_point{}) report.transfer_start = report.transfer_end = report.load_end;
    tracer_.span(trace_track::loader, "load", "bucket " + std::to_string(b), report.load_start, report.load_end);
    tracer_.span(trace_track::write, "write", "bucket " + std::to_string(b), report.transfer_start,
                 report.transfer_end);
    u.running.erase(std::find(u.running.begin(), u.running.end(), &br));
  }

  template <class Loader>
  void start_loads(update_state& u, bucket_run& br, const bucket& bk, std::span<std::byte> staging,
                   Loader& loader) {
    const auto done = [this, &br, &u, b = std::size_t(&bk - plan_.buckets().data())](std::exception_ptr e) {
      br.loads_done = true;
      br.load_failure = e;
      u.report.buckets[b].load_end = clock::now();
      br.bell.ring();
    };
    constexpr bool asynchronous =
        std::is_same_v<std::invoke_result_t<Loader&, const shard_load&>, asio::awaitable<void>>;
    if constexpr (!asynchronous) {
      if (loader_pool_) {
        // The whole bucket in one trip to the loader thread, which keeps loading while the
        // io_context writes what is ready: no round trip per shard.
        // The io_context is woken once per wake_bytes loaded, not per parameter: each wake-up
        // costs a write round, and 100,000 small parameters must cost what 20 large ones do.
        const std::uint64_t wake_bytes = std::max<std::uint64_t>(slot_bytes_ / 16, 64 << 10);
        auto load_all = [this, &u, &br, &bk, &loader, staging, wake_bytes, version = u.version] {
          std::uint64_t unannounced = 0;
          for (std::size_t i = 0; i < bk.parameters.size(); ++i) {
            const planned_parameter& p = bk.parameters[i];
            for (const auto& shard : p.parameter.shards) {
              if (u.stop_loads.load(std::memory_order_relaxed)) return;
              try {
                loader(make_load(p, shard, staging, version));
              } catch (...) {
                throw loader_error(p, shard, std::current_exception());
              }
            }
            // Published only with a wake-up: the io thread reads this line, so each store bounces it.
            unannounced += p.staging_bytes;
            if (unannounced >= wake_bytes) {
              unannounced = 0;
              br.loaded.store(i + 1, std::memory_order_release);
              wake_from_thread(br);
            }
          }
          // The rest is announced by the completion of this trip, which rings.
          br.loaded.store(bk.parameters.size(), std::memory_order_release);
        };
        detail::async_run_on(loader_pool_->get_executor(), executor_, std::move(load_all), done);
        return;
      }
    }
    asio::co_spawn(executor_, load_here(u, br, bk, staging, loader), done);
  }

  // Loads a bucket on the io_context: asynchronous loaders, or void ones without threads.
  template <class Loader>
  asio::awaitable<void, executor_type> load_here(update_state& u, bucket_run& br, const bucket& bk,
                                                 std::span<std::byte> staging, Loader& loader) {
    for (std::size_t i = 0; i < bk.parameters.size(); ++i) {
      const planned_parameter& p = bk.parameters[i];
      for (const auto& shard : p.parameter.shards) {
        if (u.stop_loads.load(std::memory_order_relaxed)) co_return;
        const shard_load load = make_load(p, shard, staging, u.version);
        std::exception_ptr failure;
        if constexpr (std::is_same_v<std::invoke_result_t<Loader&, const shard_load&>, asio::awaitable<void>>) {
          failure = co_await load_async(u, br, p, shard, loader(load));
          if (failure && u.stop_loads.load(std::memory_order_relaxed)) co_return;  // we cancelled it
        } else {
          try {
            loader(load);
          } catch (...) {
            failure = std::current_exception();
          }
        }
        if (failure) {
          bool timed_out = false;
          try {
            std::rethrow_exception(failure);
          } catch (const error& e) {
            timed_out = e.code() == errc::shard_timeout;
          } catch (...) {
          }
          if (timed_out) std::rethrow_exception(failure);
          throw loader_error(p, shard, failure);
        }
      }
      br.loaded.store(i + 1, std::memory_order_release);
      br.bell.ring();
    }
  }

  // One asynchronous shard load, cancelled by a terminal stop or after options.shard_timeout.
  asio::awaitable<std::exception_ptr, executor_type> load_async(update_state& u, bucket_run& br,
                                                                const planned_parameter& p,
                                                                const shard_source& shard,
                                                                asio::awaitable<void> work) {
    struct wait_state {
      explicit wait_state(const executor_type& ex) : bell(ex), timer(ex) {}
      detail::doorbell<executor_type> bell;
      asio::steady_timer timer;
      asio::cancellation_signal cancel;
      bool finished = false, timed_out = false;
      std::exception_ptr result;
    };
    auto w = std::make_shared<wait_state>(executor_);
    w->timer.expires_after(options_.shard_timeout);
    w->timer.async_wait([w](std::error_code ec) {
      if (ec || w->finished) return;
      w->timed_out = true;
      w->cancel.emit(asio::cancellation_type::terminal);
    });
    br.active_load = &w->cancel;
    asio::co_spawn(executor_, std::move(work),
                   asio::bind_cancellation_slot(w->cancel.slot(), [w](std::exception_ptr e) {
                     w->finished = true;
                     w->result = e;
                     w->timer.cancel();
                     w->bell.ring();
                   }));
    while (!w->finished) co_await w->bell.wait();
    br.active_load = nullptr;
    if (w->timed_out && !u.stop_loads.load(std::memory_order_relaxed)) {
      const std::string label = shard.label.empty() ? shard.tensor.name : shard.label;
      co_return std::make_exception_ptr(
          error(make_error_code(errc::shard_timeout),
                "parameter '" + p.parameter.destination.name + "': shard " + std::to_string(shard.index) + " ('" +
                    label + "') not loaded after " + std::to_string(options_.shard_timeout.count()) + " ms"));
    }
    co_return w->result;
  }

  // Posts the writes of parameters [br.written, ready) of bucket `b`: one batch per receiver,
  // requests that continue each other on both sides merged, at most the byte limit per round.
  asio::awaitable<void, executor_type> write_ready(update_state& u, bucket_run& br, std::size_t b,
                                                   slot_scratch& scratch, std::span<std::byte> staging,
                                                   std::size_t ready) {
    const bucket& bk = plan_.buckets()[b];
    const std::uint64_t max_bytes = limiter_.limits().max_bytes ? limiter_.limits().max_bytes : UINT64_MAX;
    const local_region local = registration_.region();
    std::size_t i = br.written;
    while (i < ready && u.stop != stop_kind::now) {
      for (auto& batch : scratch.batches) batch.clear();
      std::uint64_t bytes = 0;
      const std::size_t from = i;
      for (; i < ready; ++i) {
        const planned_parameter& p = bk.parameters[i];
        const std::uint64_t need = parameter_wire_bytes(p);
        if (i > from && bytes + need > max_bytes) break;
        append_writes(scratch, local, staging, p, bucket_first_[b] + i);
        bytes += need;
      }
      std::size_t operations = 0;
      for (const auto& batch : scratch.batches) operations += batch.empty() ? 0 : 1;
      if (operations == 0) continue;
      if (limiter_.too_large(operations, bytes)) {
        fail(u, make_error_code(errc::request_too_large),
             "parameter '" + bk.parameters[from].parameter.destination.name + "': " +
                 limiter_.describe_request(operations, bytes));
        co_return;
      }
      auto [ec] = co_await limiter_.async_acquire(
          operations, bytes, asio::experimental::as_tuple(asio::use_awaitable_t<executor_type>{}));
      if (ec || u.stop == stop_kind::now) {
        if (!ec) limiter_.release(operations, bytes);
        co_return;
      }
      auto& report = u.report.buckets[b];
      if (report.transfer_start == clock::time_point{}) report.transfer_start = clock::now();
      for (std::size_t r = 0; r < scratch.batches.size(); ++r) {
        const auto& batch = scratch.batches[r];
        if (batch.empty()) continue;
        std::uint64_t batch_bytes = 0;
        for (const auto& w : batch) batch_bytes += w.source.size();
        ++br.outstanding;
        ++u.writes_posted;
        receivers_[r]->async_write(batch, write_done{this, &u, &br, b, r, from, i, batch_bytes});
      }
    }
  }

  std::uint64_t parameter_wire_bytes(const planned_parameter& p) const {
    std::uint64_t n = 0;
    for (const auto& w : p.writes)
      if (receivers_[w.receiver]) n += w.bytes;
    return n;
  }

  void append_writes(slot_scratch& scratch, const local_region& local, std::span<std::byte> staging,
                     const planned_parameter& p, std::size_t position) const {
    for (const auto& w : p.writes) {
      if (!receivers_[w.receiver]) continue;
      const remote_region& region = *targets_[w.receiver][position];
      const std::byte* source = staging.data() + p.staging_offset + w.staging_offset;
      const std::uint64_t address = region.address + w.destination_offset;
      auto& batch = scratch.batches[w.receiver];
      if (!batch.empty()) {
        write_request& last = batch.back();
        if (last.source.data() + last.source.size() == source && last.remote_key == region.key &&
            last.remote_address + last.source.size() == address) {
          last.source = {last.source.data(), last.source.size() + static_cast<std::size_t>(w.bytes)};
          continue;
        }
      }
      batch.push_back({{source, static_cast<std::size_t>(w.bytes)}, local.key, address, region.key});
    }
  }

  // The completion of one receiver's batch: small and copyable, so the transport's op
  // allocator recycles it.
  struct write_done {
    update_pipeline* self;
    update_state* u;
    bucket_run* br;
    std::size_t bucket, receiver, from, to;
    std::uint64_t bytes;

    void operator()(std::error_code ec) const {
      self->limiter_.release(1, static_cast<std::size_t>(bytes));
      --br->outstanding;
      u->report.buckets[bucket].transfer_end = clock::now();
      if (!ec) {
        u->report.wire_bytes += bytes;
      } else if (!(u->stop == stop_kind::now && ec == asio::error::operation_aborted)) {
        const auto& ps = self->plan_.buckets()[bucket].parameters;
        std::string what = "parameter '" + ps[from].parameter.destination.name + "'";
        if (to - from > 1)
          what += " and " + std::to_string(to - from - 1) + " more up to '" + ps[to - 1].parameter.destination.name + "'";
        self->fail(*u, ec, what + ": write to receiver " + std::to_string(receiver) + " failed: " + ec.message());
      }
      br->bell.ring();
    }
  };

  executor_type executor_;
  transfer_plan plan_;
  pipeline_options options_;
  std::size_t depth_;
  std::uint64_t slot_bytes_;
  staging_type staging_;
  typename staging_type::block block_;
  typename Transport::registration registration_;
  basic_inflight_limiter<executor_type> limiter_;
  basic_inflight_limiter<executor_type> slots_;
  std::vector<slot_scratch> scratch_;
  std::vector<std::size_t> free_slots_;
  std::vector<connection_type*> receivers_;
  std::vector<std::vector<const remote_region*>> targets_;  // [receiver][plan position]
  std::vector<bool> writes_to_;  // [receiver]: this sender writes it at least one byte
  std::vector<std::size_t> bucket_first_;
  std::size_t parameter_count_ = 0;
  std::optional<asio::thread_pool> loader_pool_;
  [[no_unique_address]] tracer_type tracer_;
  update_report last_report_;
  bool busy_ = false;
};

}  // namespace shardline
