// The transport conformance cases: one meaning per concept, written against
// shardline/transport/concepts.hpp (transport, transport_connection, transport_receiver) and
// memory.hpp (region_table, covers), never against one implementation. Each suite that
// includes this defines its fixtures (see below) and instantiates every case for them with
// TEST_CASE_TEMPLATE_APPLY(<case id>, std::tuple<its fixtures...>); the ids are listed at
// the end of this file. Include it in one translation unit per test binary.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

namespace conformance {

namespace sl = shardline;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

// ---- running the io_context --------------------------------------------------------------

// Runs handlers until `done()`. False (the caller fails) when no handler ran for a few
// seconds, or no work is left, while `done()` is still false: a hang guard, not a deadline
// anything is measured against.
template <class Done>
bool drive(asio::io_context& io, Done done) {
  const auto give_up = clock_type::now() + 60s;  // even a loop of handlers that never ends
  while (!done()) {
    if (io.stopped()) io.restart();
    if (io.run_one_for(5s) == 0) return done();
    if (clock_type::now() > give_up) return done();
  }
  return true;
}

// Runs handlers until none has run for a moment: gives an operation that must NOT complete
// yet every chance to complete wrongly. Nothing asserts on how long anything took.
inline void settle(asio::io_context& io) {
  const auto stop = clock_type::now() + 2s;
  do {
    if (io.stopped()) io.restart();
  } while (io.run_one_for(100ms) != 0 && clock_type::now() < stop);
}

// The arguments of one completion, in shared storage: a handler still pending when a hang
// guard gives up never writes into a dead stack frame.
template <class... T>
struct outcome {
  std::shared_ptr<std::optional<std::tuple<T...>>> value = std::make_shared<std::optional<std::tuple<T...>>>();
  auto handler() {
    return [v = value](T... args) { v->emplace(std::move(args)...); };
  }
  bool ready() const { return value->has_value(); }
  std::tuple<T...>& get() { return **value; }
  std::error_code code() const { return std::get<0>(**value); }
};

using op_outcome = outcome<std::error_code>;

// ---- bytes --------------------------------------------------------------------------------

inline std::byte pattern(std::size_t i, unsigned seed) { return static_cast<std::byte>((i * 131 + seed * 29 + 1) & 0xff); }

inline std::vector<std::byte> patterned(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = pattern(i, seed);
  return v;
}

inline bool holds_pattern(std::span<const std::byte> s, unsigned seed) {
  for (std::size_t i = 0; i < s.size(); ++i)
    if (s[i] != pattern(i, seed)) return false;
  return true;
}

inline bool all_zero(std::span<const std::byte> s) {
  for (auto b : s)
    if (b != std::byte{0}) return false;
  return true;
}

// The bytes of receiver memory `s` as the host reads them: the fixture's host_copy(s) where it
// has one (a transport whose receivers expose device memory), `s` itself otherwise.
template <class F>
std::vector<std::byte> host_bytes(F& f, std::span<const std::byte> s) {
  if constexpr (requires { f.host_copy(s); })
    return f.host_copy(s);
  else
    return {s.begin(), s.end()};
}

// A source registered with the transport: the fixture's register_source(bytes) where it has
// one (a transport that cannot read pageable host memory pins it there), otherwise
// transport.register_memory(bytes).
template <class F>
auto register_source(F& f, std::span<std::byte> bytes) {
  if constexpr (requires { f.register_source(bytes); })
    return f.register_source(bytes);
  else
    return f.transport.register_memory(bytes);
}

// The shardline::error `f` throws: its code and what(); nothing when it does not throw.
template <class F>
std::optional<std::pair<std::error_code, std::string>> thrown_by(F&& f) {
  try {
    f();
  } catch (const sl::error& e) {
    return std::pair{e.code(), std::string(e.what())};
  }
  return std::nullopt;
}

inline bool mentions(std::string_view text, std::string_view word) { return text.find(word) != std::string_view::npos; }

// ---- fixtures -----------------------------------------------------------------------------
//
// A fixture F is what the cases below know of a transport. It provides:
//   using transport_type;               a model of shardline::transport
//   struct endpoint { receiver rx; };   a receiver, plus whatever a sender needs to reach it
//   asio::io_context io;                where both sides complete (one thread: this one)
//   transport_type transport;           the sender side
//   endpoint make_endpoint(std::size_t notice_depth = 64);
//                                       a fresh, listening receiver that queues `notice_depth`
//                                       notices before a notice waits for its acknowledgement
//                                       (0: each waits for an async_wait_notification)
//   connected<C> connect(endpoint&, sender_identity);
//                                       {code, connection}: a refusal is a code, however the
//                                       transport reports it (a throw, a completion)
//   void kill(endpoint&);               the receiver dies under its senders
//   static constexpr bool cancels_queued_writes;
//                                       whether a write can be waiting when its cancellation
//                                       arrives (see the cancellation case)
// and states, by static_assert, that its transport moves no cuda_device memory (the
// memory-kinds case then expects both calls to refuse it; a GPUDirect fixture would not).
// Receivers are allocated, exposed and admitted through the concept itself (allocate,
// expose, admit), always before the first connect: a transport may hand its table over then.
// Sources are registered with transport.register_memory and requests made with make_write,
// so that a transport with real keys (verbs: lkey, rkey) gets them right.
//
// Receivers whose memory the host cannot read in place (device memory) add
//   std::vector<std::byte> host_copy(std::span<const std::byte>);   the bytes, copied back
// and transports that cannot read pageable host memory add
//   R register_source(std::span<std::byte>);   R has region(), as a registration does
// (see host_bytes and register_source below); host transports need neither.
//
// Every fixture also has `static bool usable()`: false where its transport cannot run here (verbs
// without an RDMA device), and each case then returns at once, having said why.
//
// The fixtures live with their suites: loopback and shm in tests/core/test_transport_conformance.cpp,
// verbs in tests/verbs/test_transport_conformance.cpp (run inside the Soft-RoCE VM).

template <class Connection>
struct connected {
  std::error_code ec;
  std::optional<Connection> conn;
};

// ---- helpers the cases share ------------------------------------------------------------

// Connects, and fails the case when the receiver refuses.
template <class F>
typename F::connection connect_ok(F& f, typename F::endpoint& ep, sl::sender_identity who = {}) {
  auto c = f.connect(ep, who);
  REQUIRE_MESSAGE(!c.ec, "connect failed: " << c.ec.message());
  REQUIRE(c.conn.has_value());
  return std::move(*c.conn);
}

struct event {
  std::error_code ec;
  sl::notice n;
};

// The receiver's next notice; nullopt when none came (hang guard).
template <class F>
std::optional<event> next_notice(F& f, typename F::endpoint& ep) {
  outcome<std::error_code, sl::notice> got;
  ep.rx.async_wait_notification(got.handler());
  if (!drive(f.io, [&] { return got.ready(); })) return std::nullopt;
  return event{std::get<0>(got.get()), std::get<1>(got.get())};
}

// Runs one operation to its completion; nullopt when it never completed (hang guard).
template <class F, class Start>
std::optional<std::error_code> complete(F& f, Start start) {
  op_outcome done;
  start(done.handler());
  if (!drive(f.io, [&] { return done.ready(); })) return std::nullopt;
  return done.code();
}

template <class F, class Connection>
std::optional<std::error_code> write(F& f, Connection& c, const std::vector<sl::write_request>& batch) {
  return complete(f, [&](auto h) { c.async_write(batch, std::move(h)); });
}

template <class F, class Connection>
std::optional<std::error_code> notify(F& f, Connection& c, sl::notice_kind kind, std::uint32_t version) {
  return complete(f, [&](auto h) { c.async_notify(kind, version, std::move(h)); });
}

template <class Connection>
const sl::remote_region& remote(const Connection& c, std::string_view name) {
  const auto* r = c.remote_regions().find(name);
  REQUIRE_MESSAGE(r != nullptr, "the sender's table lacks '" << std::string(name) << "'");
  return *r;
}

inline const std::error_code success{};


// ---- cases --------------------------------------------------------------------------------

TEST_CASE_TEMPLATE_DEFINE("transport conformance: a notice after a completed write finds its bytes, and is acknowledged only once the receiver holds it",
                          F, notice_after_write) {
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint(0);  // no queue: the receiver holds a notice once it takes it
  auto arena = ep.rx.allocate(64 << 10);
  ep.rx.expose("layers.0.mlp.gate_up", arena.first(48 << 10));
  auto conn = connect_ok(f, ep, {3, 0});
  auto src = patterned(48 << 10, 1);
  auto reg = register_source(f, src);
  const std::vector batch{sl::make_write(reg.region(), src, remote(conn, "layers.0.mlp.gate_up"))};
  REQUIRE(write(f, conn, batch) == success);

  op_outcome notified;
  conn.async_notify(sl::notice_kind::commit, 1, notified.handler());
  settle(f.io);
  CHECK_MESSAGE(!notified.ready(), "async_notify completed before the receiver took the notice");

  outcome<std::error_code, sl::notice> got;
  bool bytes_there = false;
  ep.rx.async_wait_notification([&, v = got.value](std::error_code ec, sl::notice n) {
    bytes_there = holds_pattern(host_bytes(f, arena.first(48 << 10)), 1);  // checked in the handler itself
    v->emplace(ec, n);
  });
  REQUIRE(drive(f.io, [&] { return got.ready() && notified.ready(); }));
  CHECK(got.code() == success);
  CHECK(std::get<1>(got.get()) == sl::notice{3, sl::notice_kind::commit, 1});
  CHECK_MESSAGE(bytes_there, "the notice arrived before its write's bytes were visible");
  CHECK(notified.code() == success);
  CHECK(all_zero(host_bytes(f, arena.subspan(48 << 10))));
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: one sender's notices arrive in order, kind, version and sender intact",
                          F, notice_order) {
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint();
  ep.rx.expose("w", ep.rx.allocate(4096));
  auto conn = connect_ok(f, ep, {7, 0});
  const std::vector<std::pair<sl::notice_kind, std::uint32_t>> sent{
      {sl::notice_kind::begin, 5},  {sl::notice_kind::commit, 5}, {sl::notice_kind::begin, 6},
      {sl::notice_kind::abort, 6},  {sl::notice_kind::withdraw, 7}, {sl::notice_kind::begin, 0xfffffffe},
      {sl::notice_kind::commit, 0xfffffffe}};
  std::vector<op_outcome> acks(sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i)  // all in flight at once
    conn.async_notify(sent[i].first, sent[i].second, acks[i].handler());
  for (std::size_t i = 0; i < sent.size(); ++i) {
    CAPTURE(i);
    auto e = next_notice(f, ep);
    REQUIRE(e);
    CHECK(e->ec == success);
    CHECK(e->n == sl::notice{7, sent[i].first, sent[i].second});
  }
  REQUIRE(drive(f.io, [&] {
    for (auto& a : acks)
      if (!a.ready()) return false;
    return true;
  }));
  for (auto& a : acks) CHECK(a.code() == success);
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: a batch with a request outside every region fails whole; one over touching regions lands",
                          F, batch_validation) {
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint();
  auto arena = ep.rx.allocate(4096);
  ep.rx.expose("layers.0.q", arena.subspan(0, 1024));
  ep.rx.expose("layers.0.k", arena.subspan(1024, 1024));  // touches q
  // [2048, 4096) is allocated but exposed to nobody.
  auto conn = connect_ok(f, ep);
  const auto& q = remote(conn, "layers.0.q");
  const auto& k = remote(conn, "layers.0.k");
  auto src = patterned(2048, 2);
  auto reg = register_source(f, src);
  const auto region = reg.region();
  const std::span<const std::byte> all(src);

  SUBCASE("a request in the unexposed rest of the arena, after a valid one") {
    const std::vector batch{sl::make_write(region, all.first(1024), q),
                            sl::make_write(region, all.first(16), k, k.length + 512)};
    CHECK(write(f, conn, batch) == sl::make_error_code(sl::errc::region_not_exposed));
    CHECK_MESSAGE(all_zero(host_bytes(f, arena)), "a failed batch wrote its valid request");
  }
  SUBCASE("a request running past the last exposed byte, after a valid one") {
    const std::vector batch{sl::make_write(region, all.first(1024), q),
                            sl::make_write(region, all.first(64), k, k.length - 32)};
    CHECK(write(f, conn, batch) == sl::make_error_code(sl::errc::region_not_exposed));
    CHECK_MESSAGE(all_zero(host_bytes(f, arena)), "a failed batch wrote its valid request");
  }
  SUBCASE("one request over q and k (a coalesced write) lands") {
    REQUIRE(q.address + q.length == k.address);
    const std::vector batch{sl::make_write(region, all, q)};
    CHECK(write(f, conn, batch) == success);
    CHECK(holds_pattern(host_bytes(f, arena.first(2048)), 2));
    CHECK(all_zero(host_bytes(f, arena.subspan(2048))));
  }
  CHECK(conn.is_open());
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: a write cancelled before it runs aborts or lands, never half, and the connection goes on",
                          F, cancelled_write) {
  if (!F::usable()) return;
  F f;
  // Declared before the connection: an operation still holding its slot when the case ends
  // (a hang) clears it at close(), so the signal must outlive the connection.
  asio::cancellation_signal signal;
  auto ep = f.make_endpoint(0);
  auto arena = ep.rx.allocate(8192);
  ep.rx.expose("a", arena.first(4096));
  ep.rx.expose("b", arena.subspan(4096));
  auto conn = connect_ok(f, ep, {1, 0});
  auto src = patterned(4096, 3);
  auto reg = register_source(f, src);
  const std::vector to_a{sl::make_write(reg.region(), src, remote(conn, "a"))};
  const std::vector to_b{sl::make_write(reg.region(), src, remote(conn, "b"))};

  // A notice nobody takes yet holds the connection's order: a transport that queues writes
  // behind it has not started the write when the cancellation comes.
  op_outcome begun;
  conn.async_notify(sl::notice_kind::begin, 1, begun.handler());
  op_outcome cancelled;
  conn.async_write(to_a, asio::bind_cancellation_slot(signal.slot(), cancelled.handler()));
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(drive(f.io, [&] { return cancelled.ready(); }));
  if (F::cancels_queued_writes) {
    CHECK(cancelled.code() == asio::error::operation_aborted);
    CHECK_MESSAGE(all_zero(host_bytes(f, arena.first(4096))), "an aborted write moved bytes");
  } else {
    CHECK(cancelled.code() == success);
    CHECK(holds_pattern(host_bytes(f, arena.first(4096)), 3));
  }
  CHECK(conn.is_open());

  // The held notice is still delivered and acknowledged; the next write lands.
  auto e = next_notice(f, ep);
  REQUIRE(e);
  CHECK(e->ec == success);
  CHECK(e->n == sl::notice{1, sl::notice_kind::begin, 1});
  REQUIRE(drive(f.io, [&] { return begun.ready(); }));
  CHECK(begun.code() == success);
  CHECK(write(f, conn, to_b) == success);
  CHECK(holds_pattern(host_bytes(f, arena.subspan(4096)), 3));
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: a notice cancelled while unacknowledged completes with operation_aborted, and the connection goes on",
                          F, cancelled_notice) {
  if (!F::usable()) return;
  F f;
  asio::cancellation_signal signal;  // outlives the connection, see the cancellation case
  auto ep = f.make_endpoint(0);      // nobody takes the notice yet: it waits unacknowledged
  ep.rx.expose("w", ep.rx.allocate(4096));
  auto conn = connect_ok(f, ep, {8, 0});
  op_outcome cancelled;
  conn.async_notify(sl::notice_kind::commit, 1, asio::bind_cancellation_slot(signal.slot(), cancelled.handler()));
  settle(f.io);
  REQUIRE_FALSE(cancelled.ready());
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(drive(f.io, [&] { return cancelled.ready(); }));
  CHECK(cancelled.code() == asio::error::operation_aborted);
  CHECK(conn.is_open());

  // The next notice is delivered and acknowledged. The cancelled one may have left already
  // (a transport that had written it to its control channel): then it arrives first, intact.
  op_outcome next;
  conn.async_notify(sl::notice_kind::commit, 2, next.handler());
  auto e = next_notice(f, ep);
  REQUIRE(e);
  CHECK(e->ec == success);
  if (e->n == sl::notice{8, sl::notice_kind::commit, 1}) {
    e = next_notice(f, ep);
    REQUIRE(e);
    CHECK(e->ec == success);
  }
  CHECK(e->n == sl::notice{8, sl::notice_kind::commit, 2});
  REQUIRE(drive(f.io, [&] { return next.ready(); }));
  CHECK(next.code() == success);
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: after close() writes and notices fail with not_connected; the receiver sees the sender leave",
                          F, close_later) {
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint();
  auto arena = ep.rx.allocate(4096);
  ep.rx.expose("w", arena);
  auto conn = connect_ok(f, ep, {4, 0});
  auto src = patterned(4096, 4);
  auto reg = register_source(f, src);
  const std::vector batch{sl::make_write(reg.region(), src, remote(conn, "w"))};
  REQUIRE(notify(f, conn, sl::notice_kind::begin, 1) == success);
  CHECK(conn.is_open());
  conn.close();
  conn.close();  // twice: still nothing thrown, nothing sent twice
  CHECK_FALSE(conn.is_open());
  CHECK(write(f, conn, batch) == sl::make_error_code(sl::errc::not_connected));
  CHECK(notify(f, conn, sl::notice_kind::commit, 1) == sl::make_error_code(sl::errc::not_connected));
  CHECK(all_zero(host_bytes(f, arena)));

  auto first = next_notice(f, ep);
  REQUIRE(first);
  CHECK(first->ec == success);
  CHECK(first->n == sl::notice{4, sl::notice_kind::begin, 1});
  auto leave = next_notice(f, ep);
  REQUIRE(leave);
  CHECK(leave->ec == sl::make_error_code(sl::errc::peer_disconnected));
  CHECK(leave->n == sl::notice{4, sl::notice_kind::abort, 0});
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: close() completes the operations still pending with an error",
                          F, close_pending) {
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint(0);  // nobody takes the notice: it stays unacknowledged
  auto arena = ep.rx.allocate(4096);
  ep.rx.expose("w", arena);
  auto conn = connect_ok(f, ep, {5, 0});
  auto src = patterned(4096, 5);
  auto reg = register_source(f, src);
  const std::vector batch{sl::make_write(reg.region(), src, remote(conn, "w"))};
  op_outcome written, notified;
  conn.async_write(batch, written.handler());
  conn.async_notify(sl::notice_kind::commit, 1, notified.handler());
  conn.close();
  drive(f.io, [&] { return written.ready() && notified.ready(); });  // checked one by one below
  CHECK_MESSAGE(written.ready(), "a write pending at close() never completed");
  CHECK_MESSAGE(notified.ready(), "a notice pending at close() never completed");
  if (written.ready()) CHECK_MESSAGE(written.code() != success, "a write pending at close() succeeded");
  if (notified.ready()) CHECK_MESSAGE(notified.code() != success, "a notice pending at close() succeeded");

  // The receiver sees the sender leave; the notice, if it had gone out, comes before that.
  auto e = next_notice(f, ep);
  REQUIRE(e);
  if (!e->ec) {
    CHECK(e->n == sl::notice{5, sl::notice_kind::commit, 1});
    e = next_notice(f, ep);
    REQUIRE(e);
  }
  CHECK(e->ec == sl::make_error_code(sl::errc::peer_disconnected));
  CHECK(e->n == sl::notice{5, sl::notice_kind::abort, 0});
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: a receiver that dies fails the pending notice and later writes and notices with peer_disconnected",
                          F, peer_death) {
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint(0);
  auto arena = ep.rx.allocate(4096);
  ep.rx.expose("w", arena);
  auto conn = connect_ok(f, ep, {2, 0});
  auto src = patterned(4096, 6);
  auto reg = register_source(f, src);
  const std::vector batch{sl::make_write(reg.region(), src, remote(conn, "w"))};
  REQUIRE(write(f, conn, batch) == success);

  SUBCASE("with a notice awaiting its acknowledgement") {
    op_outcome notified;
    conn.async_notify(sl::notice_kind::commit, 1, notified.handler());
    settle(f.io);
    REQUIRE_FALSE(notified.ready());
    f.kill(ep);
    REQUIRE(drive(f.io, [&] { return notified.ready(); }));
    CHECK(notified.code() == sl::make_error_code(sl::errc::peer_disconnected));
  }
  SUBCASE("with nothing pending") {
    f.kill(ep);
  }
  // The sender learns of the death by itself; from then on the link is failed.
  REQUIRE(drive(f.io, [&] { return !conn.is_open(); }));
  CHECK(write(f, conn, batch) == sl::make_error_code(sl::errc::peer_disconnected));
  CHECK(notify(f, conn, sl::notice_kind::commit, 2) == sl::make_error_code(sl::errc::peer_disconnected));
  CHECK_FALSE(conn.is_open());
  conn.close();  // closing a failed connection never throws
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: after a region_not_exposed failure and a cancelled write the connection writes and notifies",
                          F, reuse_after_failure) {
  if (!F::usable()) return;
  F f;
  asio::cancellation_signal signal;  // outlives the connection, see the cancellation case
  auto ep = f.make_endpoint(0);
  auto arena = ep.rx.allocate(3 * 1024);
  ep.rx.expose("first", arena.subspan(0, 1024));
  ep.rx.expose("second", arena.subspan(1024, 1024));
  ep.rx.expose("third", arena.subspan(2048, 1024));
  auto conn = connect_ok(f, ep, {6, 0});
  auto src = patterned(1024, 7);
  auto reg = register_source(f, src);
  const auto& first = remote(conn, "first");
  const auto& third = remote(conn, "third");
  const std::vector outside{sl::make_write(reg.region(), src, third, 512)};  // runs off the table's end
  const std::vector to_first{sl::make_write(reg.region(), src, first)};
  const std::vector to_second{sl::make_write(reg.region(), src, remote(conn, "second"))};
  const std::vector to_third{sl::make_write(reg.region(), src, third)};

  // 1. A validation failure.
  CHECK(write(f, conn, outside) == sl::make_error_code(sl::errc::region_not_exposed));
  CHECK(conn.is_open());
  CHECK(write(f, conn, to_first) == success);
  op_outcome ack1;
  conn.async_notify(sl::notice_kind::commit, 1, ack1.handler());
  auto e = next_notice(f, ep);
  REQUIRE(e);
  CHECK(e->ec == success);
  CHECK(e->n == sl::notice{6, sl::notice_kind::commit, 1});
  REQUIRE(drive(f.io, [&] { return ack1.ready(); }));
  CHECK(ack1.code() == success);
  CHECK(holds_pattern(host_bytes(f, arena.subspan(0, 1024)), 7));

  // 2. A cancelled write (held behind a notice where writes queue).
  op_outcome ack2, cancelled;
  conn.async_notify(sl::notice_kind::begin, 2, ack2.handler());
  conn.async_write(to_second, asio::bind_cancellation_slot(signal.slot(), cancelled.handler()));
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(drive(f.io, [&] { return cancelled.ready(); }));
  CHECK(cancelled.code() == (F::cancels_queued_writes ? std::error_code(asio::error::operation_aborted) : success));
  CHECK(conn.is_open());
  e = next_notice(f, ep);
  REQUIRE(e);
  CHECK(e->n == sl::notice{6, sl::notice_kind::begin, 2});
  REQUIRE(drive(f.io, [&] { return ack2.ready(); }));
  CHECK(ack2.code() == success);

  // 3. The same connection writes and notifies.
  CHECK(write(f, conn, to_third) == success);
  op_outcome ack3;
  conn.async_notify(sl::notice_kind::commit, 2, ack3.handler());
  e = next_notice(f, ep);
  REQUIRE(e);
  CHECK(e->ec == success);
  CHECK(e->n == sl::notice{6, sl::notice_kind::commit, 2});
  REQUIRE(drive(f.io, [&] { return ack3.ready(); }));
  CHECK(ack3.code() == success);
  CHECK(holds_pattern(host_bytes(f, arena.subspan(2048, 1024)), 7));
  CHECK(holds_pattern(host_bytes(f, arena.subspan(1024, 1024)), 7) == !F::cancels_queued_writes);
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: duplicate names and overlapping regions are refused by expose, naming both",
                          F, expose_refusals) {
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint();
  auto arena = ep.rx.allocate(4096);
  ep.rx.expose("layers.0.attn.qkv", arena.subspan(0, 1024));
  ep.rx.expose("layers.0.attn.o", arena.subspan(1024, 1024));

  auto twice = thrown_by([&] { ep.rx.expose("layers.0.attn.qkv", arena.subspan(2048, 512)); });
  REQUIRE(twice);
  CHECK(twice->first == sl::make_error_code(sl::errc::invalid_argument));
  CHECK_MESSAGE(mentions(twice->second, "'layers.0.attn.qkv'"), twice->second);

  auto overlap = thrown_by([&] { ep.rx.expose("layers.0.mlp.down", arena.subspan(1536, 1024)); });
  REQUIRE(overlap);
  CHECK(overlap->first == sl::make_error_code(sl::errc::invalid_argument));
  CHECK_MESSAGE(mentions(overlap->second, "'layers.0.mlp.down'"), overlap->second);
  CHECK_MESSAGE(mentions(overlap->second, "'layers.0.attn.o'"), overlap->second);

  // Neither refusal changed the table, here or as the sender receives it.
  CHECK(ep.rx.regions().size() == 2);
  CHECK(ep.rx.regions().find("layers.0.mlp.down") == nullptr);
  CHECK(ep.rx.regions().find("layers.0.attn.qkv")->length == 1024);
  ep.rx.expose("layers.0.mlp.down", arena.subspan(2048, 1024));  // touching is no overlap
  auto conn = connect_ok(f, ep);
  CHECK(conn.remote_regions().size() == 3);
  CHECK(remote(conn, "layers.0.attn.qkv").length == 1024);
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: several senders on one receiver: each notice names its sender; admission refuses the others",
                          F, several_senders) {
  if (!F::usable()) return;
  F f;
  constexpr std::uint64_t plan = 0x5eed'f00d'1234'5678;
  constexpr std::size_t part = 4096;
  auto ep = f.make_endpoint();
  auto arena = ep.rx.allocate(3 * part);
  for (std::uint32_t s = 0; s < 3; ++s) ep.rx.expose("sender" + std::to_string(s), arena.subspan(s * part, part));
  ep.rx.admit({3, plan});

  // Refused before they learn anything; the receiver goes on accepting.
  CHECK(f.connect(ep, {1, plan + 1}).ec == sl::make_error_code(sl::errc::plan_mismatch));
  CHECK(f.connect(ep, {1, 0}).ec == sl::make_error_code(sl::errc::plan_mismatch));
  CHECK(f.connect(ep, {3, plan}).ec == sl::make_error_code(sl::errc::unknown_sender));
  CHECK(f.connect(ep, {17, plan + 1}).ec == sl::make_error_code(sl::errc::unknown_sender));

  std::vector<typename F::connection> senders;
  for (std::uint32_t s = 0; s < 3; ++s) senders.push_back(connect_ok(f, ep, {s, plan}));
  std::vector<std::vector<std::byte>> sources;
  for (unsigned s = 0; s < 3; ++s) sources.push_back(patterned(part, 10 + s));
  std::vector<op_outcome> acks(3);
  for (std::uint32_t s = 0; s < 3; ++s) {
    auto reg = register_source(f, sources[s]);
    const std::vector batch{
        sl::make_write(reg.region(), sources[s], remote(senders[s], "sender" + std::to_string(s)))};
    REQUIRE(write(f, senders[s], batch) == success);
    senders[s].async_notify(sl::notice_kind::commit, 1, acks[s].handler());
  }
  std::map<std::uint32_t, int> commits;
  for (int i = 0; i < 3; ++i) {
    auto e = next_notice(f, ep);
    REQUIRE(e);
    CHECK(e->ec == success);
    CHECK(e->n.kind == sl::notice_kind::commit);
    CHECK(e->n.version == 1);
    REQUIRE(e->n.sender < 3);
    ++commits[e->n.sender];
    CHECK(holds_pattern(host_bytes(f, arena.subspan(e->n.sender * part, part)), 10 + e->n.sender));
  }
  CHECK(commits == std::map<std::uint32_t, int>{{0, 1}, {1, 1}, {2, 1}});
  REQUIRE(drive(f.io, [&] { return acks[0].ready() && acks[1].ready() && acks[2].ready(); }));
  for (auto& a : acks) CHECK(a.code() == success);

  // Sender 1 leaves; the receiver serves the others.
  senders[1].close();
  auto leave = next_notice(f, ep);
  REQUIRE(leave);
  CHECK(leave->ec == sl::make_error_code(sl::errc::peer_disconnected));
  CHECK(leave->n == sl::notice{1, sl::notice_kind::abort, 0});
  std::vector<op_outcome> more(2);
  senders[0].async_notify(sl::notice_kind::begin, 2, more[0].handler());
  senders[2].async_notify(sl::notice_kind::begin, 2, more[1].handler());
  std::map<std::uint32_t, int> begins;
  for (int i = 0; i < 2; ++i) {
    auto e = next_notice(f, ep);
    REQUIRE(e);
    CHECK(e->ec == success);
    CHECK(e->n.kind == sl::notice_kind::begin);
    CHECK(e->n.version == 2);
    ++begins[e->n.sender];
  }
  CHECK(begins == std::map<std::uint32_t, int>{{0, 1}, {2, 1}});
  REQUIRE(drive(f.io, [&] { return more[0].ready() && more[1].ready(); }));
  CHECK(more[0].code() == success);
  CHECK(more[1].code() == success);
}

TEST_CASE_TEMPLATE_DEFINE("transport conformance: memory kinds outside source_kinds and destination_kinds fail with unsupported_memory",
                          F, memory_kinds) {
  using T = typename F::transport_type;
  if (!F::usable()) return;
  F f;
  auto ep = f.make_endpoint();
  auto arena = ep.rx.allocate(3 * 1024);
  std::vector<std::byte> staging(1024);
  const sl::memory_location kinds[] = {sl::memory_location::host(), sl::memory_location::host_pinned(),
                                       sl::memory_location::cuda(0)};
  // The cases need host memory that is both source and destination.
  REQUIRE(T::source_kinds.contains(sl::memory_kind::host));
  REQUIRE(T::destination_kinds.contains(sl::memory_kind::host));
  std::size_t slot = 0;
  for (const auto& where : kinds) {
    CAPTURE(sl::to_string(where));
    const bool device = where.kind == sl::memory_kind::cuda_device;
    if (T::source_kinds.contains(where.kind)) {
      if (!device) CHECK(f.transport.register_memory(staging, where).region().location == where);
      // (a transport that moves device memory needs a device to show it: not here)
    } else {
      auto e = thrown_by([&] { (void)f.transport.register_memory(staging, where); });
      REQUIRE_MESSAGE(e, "register_memory took " << sl::to_string(where) << " memory");
      CHECK(e->first == sl::make_error_code(sl::errc::unsupported_memory));
      CHECK_MESSAGE(mentions(e->second, sl::to_string(where)), e->second);
    }
    const std::string name = "tensor." + std::string(sl::to_string(where.kind));
    const auto bytes = arena.subspan(1024 * slot++, 1024);
    if (T::destination_kinds.contains(where.kind)) {
      if (!device) {
        ep.rx.expose({name, bytes, where, std::nullopt});
        CHECK(ep.rx.regions().find(name)->location == where);
      }
    } else {
      auto e = thrown_by([&] { ep.rx.expose({name, bytes, where, std::nullopt}); });
      REQUIRE_MESSAGE(e, "expose took " << sl::to_string(where) << " memory");
      CHECK(e->first == sl::make_error_code(sl::errc::unsupported_memory));
      CHECK_MESSAGE(mentions(e->second, "'" + name + "'"), e->second);
      CHECK(ep.rx.regions().find(name) == nullptr);
    }
  }
}

}  // namespace conformance

// Case ids, for TEST_CASE_TEMPLATE_APPLY inside namespace conformance: notice_after_write, notice_order, batch_validation,
// cancelled_write, cancelled_notice, close_later, close_pending, peer_death, reuse_after_failure,
// expose_refusals, several_senders, memory_kinds.
