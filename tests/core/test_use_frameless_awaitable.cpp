#include <shardline/async/use_frameless_awaitable.hpp>

#include <shardline/async/detail/run_on.hpp>
#include <shardline/detail/completion.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/transport/loopback.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/thread_pool.hpp>

#include <doctest/doctest.h>

#include "../support/checks.hpp"
#include "../support/shard_pattern.hpp"

#include <chrono>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <tuple>
#include <variant>
#include <vector>

namespace sl = shardline;
using namespace std::chrono_literals;
using sl::testing::drive;
using sl::testing::settle;

namespace {

using typed_executor = asio::io_context::executor_type;
constexpr sl::use_frameless_awaitable_t<typed_executor> typed_token{};

// An operation that completes with `args` through post_completion on `io`, as the transports do.
template <class Signature, class Executor, class Token, class... Args>
auto async_complete_with(const Executor& io, Token&& token, Args... args) {
  return asio::async_initiate<Token, Signature>(
      [io](auto handler, Args... args) { sl::detail::post_completion(io, std::move(handler), std::move(args)...); },
      token, std::move(args)...);
}

// Runs `coroutine` on `ex` and records how it ended.
struct outcome {
  bool done = false;
  std::exception_ptr failure;
  auto handler() {
    return [this](std::exception_ptr e) {
      done = true;
      failure = e;
    };
  }
};

template <class Executor, class Awaitable>
void spawn(const Executor& ex, Awaitable coroutine, outcome& out) {
  asio::co_spawn(ex, std::move(coroutine), out.handler());
}

// One receiver region "p" of `bytes` and a connection of sender 0 to it.
template <class Transport>
struct loopback_pair {
  loopback_pair(asio::io_context& io, std::size_t bytes)
      : transport(typename Transport::executor_type(io.get_executor())), receiver(transport.get_executor()) {
    arena = receiver.allocate(bytes);
    receiver.expose("p", arena);
    conn.emplace(transport.connect(receiver));
  }
  Transport transport;
  typename Transport::receiver receiver;
  std::span<std::byte> arena;
  std::optional<typename Transport::connection> conn;
};

// Coroutine functions take their parameters by value (g++ 12 and capturing coroutine lambdas).

template <class Executor, class Token>
asio::awaitable<void, Executor> take_value(Executor io, Token token, std::unique_ptr<int>* got) {
  *got = co_await async_complete_with<void(std::error_code, std::unique_ptr<int>)>(
      io, token, std::error_code{}, std::make_unique<int>(42));
}

template <class Executor, class Token>
asio::awaitable<void, Executor> write_outside(sl::basic_loopback_transport<Executor>* t,
                                              typename sl::basic_loopback_transport<Executor>::connection* c,
                                              Token token) {
  std::vector<std::byte> source(16, std::byte{1});
  auto where = *c->remote_regions().find("p");
  const auto request = sl::make_write(t->register_memory(source).region(), source, where, where.length - 8);
  co_await c->async_write(std::span<const sl::write_request>(&request, 1), token);
}

template <class Executor>
asio::awaitable<void, Executor> write_one(sl::basic_loopback_transport<Executor>* t,
                                          typename sl::basic_loopback_transport<Executor>::connection* c,
                                          std::vector<std::byte>* source, int* written) {
  const auto request = sl::make_write(t->register_memory(*source).region(), *source, *c->remote_regions().find("p"));
  co_await c->async_write(std::span<const sl::write_request>(&request, 1),
                          sl::use_frameless_awaitable_t<Executor>{});
  ++*written;
}

asio::awaitable<void> every_shape(asio::io_context::executor_type io, std::string* log) {
  co_await asio::post(io, sl::use_frameless_awaitable);  // void()
  const int one = co_await async_complete_with<void(int)>(io, sl::use_frameless_awaitable, 7);
  const auto [n, text] = co_await async_complete_with<void(std::error_code, int, std::string)>(
      io, sl::use_frameless_awaitable, std::error_code{}, 3, std::string("three"));
  const std::string s = co_await async_complete_with<void(std::exception_ptr, std::string)>(
      io, sl::use_frameless_awaitable, std::exception_ptr{}, std::string("fine"));
  *log = std::to_string(one) + " " + std::to_string(n) + " " + text + " " + s;
}

asio::awaitable<void> run_throwing(asio::thread_pool::executor_type worker, asio::io_context::executor_type io) {
  co_await sl::detail::async_run_on(worker, io, [] { throw std::runtime_error("loader of layer 7 broke"); },
                                    sl::use_frameless_awaitable);
}

asio::awaitable<void> as_tuples(asio::io_context::executor_type io, std::error_code* ec, int* value) {
  auto [e, v] = co_await async_complete_with<void(std::error_code, int)>(
      io, asio::experimental::as_tuple(sl::use_frameless_awaitable), make_error_code(sl::errc::ack_timeout), 5);
  *ec = e;
  *value = v;
}

asio::awaitable<void> wait_long(asio::steady_timer* timer, std::error_code* ended) {
  try {
    co_await timer->async_wait(sl::use_frameless_awaitable);
  } catch (const std::system_error& e) {
    *ended = e.code();
  }
}

asio::awaitable<void> race(asio::steady_timer* timer, std::error_code* loser_ended, std::size_t* winner) {
  using namespace asio::experimental::awaitable_operators;
  auto r = co_await (wait_long(timer, loser_ended) || asio::post(asio::use_awaitable));
  *winner = r.index();
}

// Where the coroutine runs after an operation of the transport (on io.get_executor()) completes.
asio::awaitable<void> write_then_check(sl::loopback_transport* t, sl::loopback_transport::connection* c,
                                       asio::strand<asio::io_context::executor_type> strand, bool* on_strand) {
  std::vector<std::byte> source(8, std::byte{3});
  const auto request = sl::make_write(t->register_memory(source).region(), source, *c->remote_regions().find("p"));
  co_await c->async_write(std::span<const sl::write_request>(&request, 1), sl::use_frameless_awaitable);
  *on_strand = strand.running_in_this_thread();
}

asio::awaitable<void, typed_executor> write_on(sl::basic_loopback_transport<typed_executor>* t,
                                               sl::basic_loopback_transport<typed_executor>::connection* c,
                                               asio::io_context* mine, asio::io_context* transports,
                                               std::optional<bool>* on_mine) {
  std::vector<std::byte> source(8, std::byte{4});
  const auto request = sl::make_write(t->register_memory(source).region(), source, *c->remote_regions().find("p"));
  co_await c->async_write(std::span<const sl::write_request>(&request, 1), typed_token);
  *on_mine = mine->get_executor().running_in_this_thread() && !transports->get_executor().running_in_this_thread();
}

struct sets_on_destruction {
  bool* flag;
  ~sets_on_destruction() { *flag = true; }
};

asio::awaitable<void> await_dropped(asio::io_context::executor_type io, bool* unwound, bool* resumed) {
  sets_on_destruction guard{unwound};
  co_await asio::async_initiate<decltype(sl::use_frameless_awaitable), void(std::error_code)>(
      [](auto handler) { (void)std::move(handler); }, sl::use_frameless_awaitable);  // destroyed, never called
  *resumed = true;
}

template <class T>
struct counting_allocator {
  using value_type = T;
  std::size_t* allocations;
  std::size_t* deallocations;
  explicit counting_allocator(std::size_t* a, std::size_t* d) : allocations(a), deallocations(d) {}
  template <class U>
  counting_allocator(const counting_allocator<U>& o) noexcept : allocations(o.allocations), deallocations(o.deallocations) {}
  T* allocate(std::size_t n) {
    ++*allocations;
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) {
    ++*deallocations;
    std::allocator<T>().deallocate(p, n);
  }
  template <class U>
  bool operator==(const counting_allocator<U>& o) const noexcept { return allocations == o.allocations; }
};

// A move-only handler on the io executor with its own allocator and cancellation slot.
struct probe_handler {
  using executor_type = typed_executor;
  using allocator_type = counting_allocator<void>;
  using cancellation_slot_type = asio::cancellation_slot;
  executor_type get_executor() const noexcept { return ex; }
  allocator_type get_allocator() const noexcept { return alloc; }
  cancellation_slot_type get_cancellation_slot() const noexcept { return slot; }
  void operator()(std::error_code ec) { *out = ec; }

  executor_type ex;
  allocator_type alloc;
  asio::cancellation_slot slot;
  std::optional<std::error_code>* out;
  std::unique_ptr<int> move_only = std::make_unique<int>(1);
};

}  // namespace

TEST_CASE("use_frameless_awaitable: the value comes back moved (a move-only value), typed and type-erased") {
  asio::io_context io;
  std::unique_ptr<int> typed_got, erased_got;
  outcome typed, erased;
  spawn(io.get_executor(), take_value<typed_executor>(io.get_executor(), typed_token, &typed_got), typed);
  spawn(io.get_executor(),
        take_value<asio::any_io_executor>(io.get_executor(), sl::use_frameless_awaitable, &erased_got), erased);
  REQUIRE(drive(io, [&] { return typed.done && erased.done; }));
  CHECK(!typed.failure);
  CHECK(!erased.failure);
  REQUIRE(typed_got);
  REQUIRE(erased_got);
  CHECK(*typed_got == 42);
  CHECK(*erased_got == 42);
}

TEST_CASE("use_frameless_awaitable: a failed write throws std::system_error with its code and use_awaitable's message") {
  asio::io_context io;
  loopback_pair<sl::loopback_transport> p(io, 64);
  outcome frameless, reference;
  spawn(io.get_executor(), write_outside<asio::any_io_executor>(&p.transport, &*p.conn, sl::use_frameless_awaitable),
        frameless);
  spawn(io.get_executor(), write_outside<asio::any_io_executor>(&p.transport, &*p.conn, asio::use_awaitable),
        reference);
  REQUIRE(drive(io, [&] { return frameless.done && reference.done; }));
  std::string frameless_what, reference_what;
  try {
    REQUIRE(frameless.failure);
    std::rethrow_exception(frameless.failure);
  } catch (const std::system_error& e) {
    CHECK(e.code() == sl::errc::region_not_exposed);
    frameless_what = e.what();
  }
  try {
    REQUIRE(reference.failure);
    std::rethrow_exception(reference.failure);
  } catch (const std::system_error& e) {
    reference_what = e.what();
  }
  CHECK(frameless_what == reference_what);
  sl::testing::check_text(frameless_what, sl::make_error_code(sl::errc::region_not_exposed).message(), {});
  CHECK(p.arena[63] == std::byte{0});
}

TEST_CASE("use_frameless_awaitable: void(), void(T), several values as a tuple, exception_ptr with a value") {
  asio::io_context io;
  std::string log;
  outcome out;
  spawn(io.get_executor(), every_shape(io.get_executor(), &log), out);
  REQUIRE(drive(io, [&] { return out.done; }));
  CHECK(!out.failure);
  CHECK(log == "7 3 three fine");
}

TEST_CASE("use_frameless_awaitable: an exception_ptr completion rethrows the very exception") {
  asio::io_context io;
  asio::thread_pool pool(1);
  outcome out;
  spawn(io.get_executor(), run_throwing(pool.get_executor(), io.get_executor()), out);
  REQUIRE(drive(io, [&] { return out.done; }));
  REQUIRE(out.failure);
  try {
    std::rethrow_exception(out.failure);
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "loader of layer 7 broke");
  }
  pool.join();
}

TEST_CASE("use_frameless_awaitable: as_tuple gives the whole completion and never throws") {
  asio::io_context io;
  std::error_code ec;
  int value = 0;
  outcome out;
  spawn(io.get_executor(), as_tuples(io.get_executor(), &ec, &value), out);
  REQUIRE(drive(io, [&] { return out.done; }));
  CHECK(!out.failure);
  CHECK(ec == sl::errc::ack_timeout);
  CHECK(value == 5);
}

TEST_CASE("use_frameless_awaitable: cancelling the coroutine (co_spawn with bind_cancellation_slot) cancels the awaited operation") {
  asio::io_context io;
  asio::steady_timer timer(io, 1h);
  asio::cancellation_signal signal;
  std::error_code ended;
  outcome out;
  asio::co_spawn(io, wait_long(&timer, &ended), asio::bind_cancellation_slot(signal.slot(), out.handler()));
  settle(io);
  REQUIRE(!out.done);
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(drive(io, [&] { return out.done; }));
  CHECK(!out.failure);
  CHECK(ended == asio::error::operation_aborted);
}

TEST_CASE("use_frameless_awaitable: awaitable operators cancel the losing branch's awaited operation") {
  asio::io_context io;
  asio::steady_timer timer(io, 1h);
  std::error_code loser_ended;
  std::size_t winner = 9;
  outcome out;
  spawn(io.get_executor(), race(&timer, &loser_ended, &winner), out);
  REQUIRE(drive(io, [&] { return out.done; }));
  CHECK(!out.failure);
  CHECK(winner == 1);
  CHECK(loser_ended == asio::error::operation_aborted);
}

TEST_CASE("use_frameless_awaitable: the coroutine resumes on its own executor (a strand), not the transport's") {
  asio::io_context io;
  loopback_pair<sl::loopback_transport> p(io, 64);
  auto strand = asio::make_strand(io.get_executor());
  bool on_strand = false;
  outcome out;
  spawn(strand, write_then_check(&p.transport, &*p.conn, strand, &on_strand), out);
  REQUIRE(drive(io, [&] { return out.done; }));
  CHECK(!out.failure);
  CHECK(on_strand);
  CHECK(p.arena[7] == std::byte{3});
}

TEST_CASE("use_frameless_awaitable: an operation of another io_context (same executor type) completes on the coroutine's") {
  asio::io_context mine, transports;
  loopback_pair<sl::basic_loopback_transport<typed_executor>> p(transports, 64);
  std::optional<bool> on_mine;
  outcome out;
  spawn(mine.get_executor(), write_on(&p.transport, &*p.conn, &mine, &transports, &on_mine), out);
  settle(mine);  // runs up to the write, which posts its completion to `transports`
  CHECK(p.arena[0] == std::byte{4});
  settle(transports);  // hands the completion on to `mine`, without running it
  CHECK(!on_mine.has_value());
  settle(mine);
  REQUIRE(on_mine.has_value());
  CHECK(*on_mine);
  CHECK(out.done);
  CHECK(!out.failure);
}

TEST_CASE("use_frameless_awaitable: a handler destroyed without a call unwinds the coroutine, never resumes it") {
  asio::io_context io;
  bool unwound = false, resumed = false;
  outcome out;
  spawn(io.get_executor(), await_dropped(io.get_executor(), &unwound, &resumed), out);
  settle(io);
  CHECK(unwound);
  CHECK(!resumed);
  CHECK(!out.done);
}

TEST_CASE("use_frameless_awaitable: typed loopback end to end, a pipeline update commits at a weights_receiver") {
  using transport_type = sl::basic_loopback_transport<typed_executor>;
  using pipeline_type = sl::update_pipeline<transport_type>;
  asio::io_context io;
  transport_type transport(io.get_executor());
  std::vector<sl::parameter_descriptor> model;
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    model.push_back({p + "self_attn.q_proj.weight", sl::dtype::bf16, {16, 16}});
    model.push_back({p + "self_attn.k_proj.weight", sl::dtype::bf16, {8, 16}});
    model.push_back({p + "self_attn.v_proj.weight", sl::dtype::bf16, {8, 16}});
    model.push_back({p + "mlp.down_proj.weight", sl::dtype::bf16, {16, 32}});
  }
  sl::plan_options options;
  options.bucket_bytes = 1024;
  const auto plan = sl::transfer_plan::build(model, sl::shard_map::standard(), options);
  REQUIRE(plan.receivers() == 1);
  transport_type::receiver endpoint(io.get_executor());
  sl::weights_receiver<transport_type::receiver> weights(endpoint, plan, 0);
  auto conn = transport.connect(endpoint, {0, plan.fingerprint()});
  pipeline_type pipeline(transport, plan, {&conn});

  std::optional<sl::update_report> report;
  std::optional<std::uint32_t> committed;
  outcome out;
  asio::co_spawn(
      io,
      [](pipeline_type* pl, sl::weights_receiver<transport_type::receiver>* w, std::optional<sl::update_report>* rep,
         std::optional<std::uint32_t>* com) -> asio::awaitable<void, typed_executor> {
        *rep = co_await pl->async_update(1, sl::testing::fill, typed_token);
        *com = co_await w->async_wait_commit(typed_token);
      }(&pipeline, &weights, &report, &committed),
      out.handler());
  REQUIRE(drive(io, [&] { return out.done; }));
  CHECK(!out.failure);
  REQUIRE(report.has_value());
  CHECK(committed == std::optional<std::uint32_t>(1));
  for (const auto& p : weights.parameters()) {
    INFO("parameter " << p.name);
    const auto want = sl::testing::expected_bytes(plan, 0, p, 1);
    const auto got = weights.parameter(p.name);
    REQUIRE(got.size() == want.size());
    CHECK(std::memcmp(got.data(), want.data(), want.size()) == 0);
  }
}

TEST_CASE("post_completion: on the handler's own executor no work_dispatcher hop; allocator and cancellation slot kept, handler moved") {
  using bound = sl::detail::bound_completion<probe_handler, std::error_code>;
  static_assert(!asio::detail::is_work_dispatcher_required<bound, typed_executor>::value,
                "the fast path must post without Asio's work_dispatcher");
  static_assert(asio::detail::is_work_dispatcher_required<probe_handler, typed_executor>::value,
                "(the handler itself would get one)");
  static_assert(!std::is_copy_constructible_v<bound>);

  asio::io_context io;
  std::size_t allocations = 0, deallocations = 0;
  asio::cancellation_signal signal;
  std::optional<std::error_code> got;
  {
    bound b(probe_handler{io.get_executor(), counting_allocator<void>(&allocations, &deallocations), signal.slot(),
                          &got});
    CHECK(asio::get_associated_cancellation_slot(b) == signal.slot());
    CHECK(asio::get_associated_allocator(b).allocations == &allocations);
  }
  sl::detail::post_completion(
      io.get_executor(),
      probe_handler{io.get_executor(), counting_allocator<void>(&allocations, &deallocations), signal.slot(), &got},
      make_error_code(sl::errc::stale_version));
  CHECK(!got.has_value());  // never inline
  CHECK(allocations == 1);  // the posted operation, with the handler's allocator
  settle(io);
  REQUIRE(got.has_value());
  CHECK(*got == sl::errc::stale_version);
  CHECK(deallocations == allocations);
}

TEST_CASE("post_completion: a handler on another executor of the same type, or on a strand, runs there") {
  asio::io_context io, other;
  std::optional<bool> ran_on_other, ran_on_strand;
  auto strand = asio::make_strand(io.get_executor());
  sl::detail::post_completion(io.get_executor(), asio::bind_executor(other.get_executor(), [&](std::error_code) {
                                ran_on_other = other.get_executor().running_in_this_thread();
                              }),
                              std::error_code{});
  sl::detail::post_completion(io.get_executor(), asio::bind_executor(strand, [&](std::error_code) {
                                ran_on_strand = strand.running_in_this_thread();
                              }),
                              std::error_code{});
  settle(io);
  CHECK(!ran_on_other.has_value());
  REQUIRE(ran_on_strand.has_value());
  CHECK(*ran_on_strand);
  settle(other);
  REQUIRE(ran_on_other.has_value());
  CHECK(*ran_on_other);
}
