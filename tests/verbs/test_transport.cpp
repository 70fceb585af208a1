// The verbs transport's data path end to end, both peers in this process over the
// Soft-RoCE device (tests/rxe/run), plus a receiver in a forked child that gets killed
// mid-update. Admission, notices between several senders and adopted memory are in
// test_control.cpp.
#include <shardline/transport/verbs/transport.hpp>

#include "verbs_support.hpp"

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <vector>

using namespace verbs_test;

TEST_CASE("verbs transport: no RDMA device is a clear error at construction") {
  if (!sv::device_list().empty()) return;  // the device suite covers the named case there
  asio::io_context io;
  try {
    sv::verbs_transport t(io.get_executor(), keyed());
    FAIL("a transport without a device should not construct");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::no_device);
    CHECK(std::string(e.what()).find("no RDMA device") != std::string::npos);
  }
}

TEST_CASE("verbs transport: small, split and back-pressured writes land byte-exact") {
  if (!have_device()) return;
  sv::options o;
  o.queue_pairs = 4;
  o.max_send_wr = 16;       // far fewer than the batch: back-pressure, not failure
  o.cq_entries = 32;
  o.signal_every = 4;
  o.max_wr_per_post = 8;
  o.max_write_bytes = 4096; // splits everything bigger
  pair<> p(o);
  fill(p.staging, 1);
  // 300 requests of 1..20000 bytes spread over three regions, plus one 1 MiB write.
  std::vector<sl::write_request> batch;
  std::size_t off = 0;
  for (int i = 0; i < 300; ++i) {
    const std::size_t n = 1 + (i * 7919u) % 20000;
    const std::size_t reg = i % 3, at = off % ((1 << 20) - n);
    batch.push_back(sl::make_write(p.reg.region(), p.local(reg).subspan(at, n), p.region(reg), at));
    off += n;
  }
  batch.push_back(sl::make_write(p.reg.region(), p.local(3), p.region(3)));
  bool done = false;
  std::error_code result = sl::errc::protocol_error;
  p.conn->async_write(batch, [&](std::error_code ec) {
    result = ec;
    done = true;
  });
  CHECK_FALSE(done);  // never completes inline
  REQUIRE(run_until(p.io, [&] { return done; }));
  CHECK_FALSE(result);
  for (auto& w : batch) {
    const auto* r = p.conn->remote_regions().find(w.remote_address, w.source.size());
    REQUIRE(r);
    const std::size_t i = static_cast<std::size_t>(r - p.conn->remote_regions().regions().data());
    CHECK(same(w.source, p.remote(i).subspan(w.remote_address - r->address, w.source.size())));
  }
  CHECK(p.conn->is_open());
}

TEST_CASE("verbs transport: batches larger than the send queue complete with use_future and deferred") {
  if (!have_device()) return;
  sv::options o;
  o.max_send_wr = 8;
  o.cq_entries = 16;
  o.max_write_bytes = 1024;
  pair<> p(o, 256 << 10, 2);
  fill(p.staging, 2);
  std::vector<sl::write_request> batch;
  for (std::size_t i = 0; i < 64; ++i)
    batch.push_back(sl::make_write(p.reg.region(), p.local(0).subspan(i * 4096, 4096),
                                   p.region(0), i * 4096));
  auto f = p.conn->async_write(batch, asio::use_future);
  REQUIRE(run_until(p.io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  CHECK_NOTHROW(f.get());
  CHECK(same(p.local(0).subspan(0, 64 * 4096), p.remote(0).subspan(0, 64 * 4096)));

  const auto w = sl::make_write(p.reg.region(), p.local(1), p.region(1));
  auto deferred = p.conn->async_write(std::span(&w, 1), asio::experimental::deferred);
  bool done = false;
  std::error_code result = sl::errc::protocol_error;
  std::move(deferred)([&](std::error_code ec) {
    result = ec;
    done = true;
  });
  REQUIRE(run_until(p.io, [&] { return done; }));
  CHECK_FALSE(result);
  CHECK(same(p.local(1), p.remote(1)));
}

namespace {
// Initiates every write and its commit notice without waiting for either: each notice must
// still reach the receiver only after the bytes of every write initiated before it.
void send_versions(sv::verbs_transport::connection& c, const std::vector<sl::write_request>& w,
                   int* acked, std::error_code* first_error) {
  for (std::size_t v = 0; v < w.size(); ++v) {
    c.async_write(std::span(&w[v], 1), [=](std::error_code ec) {
      if (ec && !*first_error) *first_error = ec;
    });
    c.async_notify(sl::notice_kind::commit, static_cast<std::uint32_t>(100 + v),
                   [=](std::error_code ec) {
                     if (ec && !*first_error) *first_error = ec;
                     ++*acked;
                   });
  }
}

asio::awaitable<void> receive_versions(sv::verbs_transport::receiver* r, std::vector<std::byte>* expect,
                                       std::span<std::byte> arena, std::size_t slot, int versions,
                                       int* received, int* in_order, int* visible) {
  for (int v = 0; v < versions; ++v) {
    const sl::notice n = co_await r->async_wait_notification(asio::use_awaitable);
    *in_order += n == sl::notice{9, sl::notice_kind::commit, static_cast<std::uint32_t>(100 + v)};
    // Every byte of versions 0..v is visible when the commit of v arrives.
    *visible += std::memcmp(arena.data(), expect->data(), (v + 1) * slot) == 0;
    ++*received;
  }
}
}  // namespace

TEST_CASE("verbs transport: notices arrive in order, after the bytes of every write initiated before them") {
  if (!have_device()) return;
  for (std::size_t qps : {std::size_t{1}, std::size_t{3}}) {
    CAPTURE(qps);
    sv::options o;
    o.queue_pairs = qps;
    o.max_write_bytes = 8192;
    const int versions = 12;
    const std::size_t slot = 64 << 10;
    asio::io_context io;
    sv::verbs_transport t(io.get_executor(), keyed(o));
    sv::verbs_transport::receiver r(t, listen_endpoint());
    auto arena = r.allocate(slot * versions);
    r.expose("model", arena);
    std::vector<std::byte> staging(arena.size());
    fill(staging, 3 + static_cast<unsigned>(qps));
    auto reg = t.register_memory(staging);
    auto h = connect(io, t, r, {9, 0});
    REQUIRE_FALSE(h.connect_ec);
    REQUIRE_FALSE(h.accept_ec);
    CHECK(h.sender == 9);
    auto& c = *h.conn;
    CHECK(c.identity().sender == 9);
    std::vector<sl::write_request> w;
    for (int v = 0; v < versions; ++v)
      w.push_back(sl::make_write(reg.region(), std::span(staging).subspan(v * slot, slot),
                                 c.remote_regions().regions()[0], v * slot));
    int acked = 0, received = 0, in_order = 0, visible = 0;
    std::error_code first_error;
    asio::co_spawn(io, receive_versions(&r, &staging, arena, slot, versions, &received, &in_order, &visible),
                   asio::detached);
    send_versions(c, w, &acked, &first_error);
    REQUIRE(run_until(io, [&] { return acked == versions && received == versions; }));
    CHECK_FALSE(first_error);
    CHECK(in_order == versions);
    CHECK(visible == versions);
  }
}

TEST_CASE("verbs transport: a wrong rkey fails with remote access error, the QPs are not reused, an abort still reaches the receiver") {
  if (!have_device()) return;
  sv::options o;
  o.queue_pairs = 1;  // RC order: the sibling is posted behind the failing WR
  pair<> p(o, 1 << 20, 4, {4, 0});
  fill(p.staging, 4);
  auto bad = sl::make_write(p.reg.region(), p.local(0).subspan(0, 4096), p.region(0));
  bad.remote_key ^= 0x5a5a00;  // wrong rkey
  const auto good = sl::make_write(p.reg.region(), p.local(1), p.region(1));
  std::vector<sl::write_request> batch{bad, good};
  int done = 0;
  std::error_code first, second;
  p.conn->async_write(batch, [&](std::error_code ec) { first = ec; ++done; });
  p.conn->async_write(std::span(&good, 1), [&](std::error_code ec) { second = ec; ++done; });
  REQUIRE(run_until(p.io, [&] { return done == 2; }));
  REQUIRE(first);
  CHECK(first.category() == sv::wc_category());
  CHECK(first.value() == IBV_WC_REM_ACCESS_ERR);
  CHECK(first.message() == ibv_wc_status_str(IBV_WC_REM_ACCESS_ERR));
  const std::string why = sv::describe(p.conn->remote_regions(), bad, first);
  CHECK(why.find("region 'layer0.weight'") != std::string::npos);
  CHECK(why.find("remote access error") != std::string::npos);
  // Its sibling did not hang either: flushed when the QP went to the error state.
  CHECK(second.category() == sv::wc_category());
  CHECK(second.value() == IBV_WC_WR_FLUSH_ERR);
  CHECK_FALSE(p.conn->is_open());
  // Never reused silently: later writes fail at once.
  std::error_code later;
  bool later_done = false;
  p.conn->async_write(std::span(&good, 1), [&](std::error_code ec) { later = ec; later_done = true; });
  CHECK_FALSE(later_done);
  REQUIRE(run_until(p.io, [&] { return later_done; }));
  CHECK(later == sl::errc::connection_failed);
  CHECK(later.message().find("error state") != std::string::npos);
  // The control connection is fine: the sender can still tell the receiver it gave up.
  std::optional<std::error_code> notified;
  std::optional<sl::notice> got;
  p.conn->async_notify(sl::notice_kind::abort, 3, [&](std::error_code ec) { notified = ec; });
  p.r.async_wait_notification([&](std::error_code ec, sl::notice n) {
    CHECK_FALSE(ec);
    got = n;
  });
  REQUIRE(run_until(p.io, [&] { return notified && got; }));
  CHECK_FALSE(*notified);
  CHECK(*got == sl::notice{4, sl::notice_kind::abort, 3});
}

TEST_CASE("verbs transport: a batch reaching past every exposed region fails whole with region_not_exposed, and the connection goes on") {
  if (!have_device()) return;
  pair<> p(sv::options{}, 64 << 10, 2);
  fill(p.staging, 3);
  // Region 1 is the end of the table; 4 KiB at its last byte run past it. The valid request
  // before it is not written either.
  const auto good = sl::make_write(p.reg.region(), p.local(0), p.region(0));
  const auto past = sl::make_write(p.reg.region(), p.local(0).subspan(0, 4096), p.region(1), (64 << 10) - 1);
  std::vector<sl::write_request> batch{good, past};
  auto f = p.conn->async_write(batch, asio::use_future);
  REQUIRE(run_until(p.io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  try {
    f.get();
    FAIL("a write outside the exposed regions should fail");
  } catch (const std::system_error& e) {
    CHECK(e.code() == sl::errc::region_not_exposed);
    const std::string why = sv::describe(p.conn->remote_regions(), past, e.code());
    CHECK(why.find("overrunning region 'layer1.weight'") != std::string::npos);
  }
  CHECK(all_zero(p.arena));
  CHECK(p.conn->is_open());
  // Two touching regions of one arena take one coalesced request.
  const auto both = sl::make_write(p.reg.region(), p.staging, p.region(0));
  auto g = p.conn->async_write(std::span(&both, 1), asio::use_future);
  REQUIRE(run_until(p.io, [&] { return g.wait_for(0s) == std::future_status::ready; }));
  CHECK_NOTHROW(g.get());
  CHECK(same(p.staging, p.arena));
}

TEST_CASE("verbs transport: a cancelled write stops posting, completes with operation_aborted and leaves the connection usable") {
  if (!have_device()) return;
  sv::options o;
  o.queue_pairs = 2;
  o.max_write_bytes = 4096;  // 1 MiB = 256 WRs
  o.max_send_wr = 8;         // 16 posted at most: the rest waits, and is never posted
  pair<> p(o, 1 << 20, 4);
  fill(p.staging, 7);
  std::vector<sl::write_request> w;
  for (std::size_t i = 0; i < 4; ++i) w.push_back(sl::make_write(p.reg.region(), p.local(i), p.region(i)));

  SUBCASE("terminal, the only write outstanding") {
    asio::cancellation_signal signal;
    std::optional<std::error_code> result;
    p.conn->async_write(std::span(&w[0], 1), asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) {
                          result = ec;
                        }));
    signal.emit(asio::cancellation_type::terminal);
    REQUIRE(run_until(p.io, [&] { return result.has_value(); }));
    CHECK(*result == asio::error::operation_aborted);
    // What was never posted never landed: the second half of the region is untouched.
    CHECK(all_zero(p.remote(0).subspan(512 << 10)));
  }
  SUBCASE("terminal, once every WR is posted: nothing to stop, it lands") {
    asio::cancellation_signal signal;
    std::optional<std::error_code> result;
    const auto small = sl::make_write(p.reg.region(), p.local(0).first(64 << 10), p.region(0));  // 16 WRs
    p.conn->async_write(std::span(&small, 1), asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) {
                          result = ec;
                        }));
    signal.emit(asio::cancellation_type::terminal);
    REQUIRE(run_until(p.io, [&] { return result.has_value(); }));
    CHECK_FALSE(*result);
    CHECK(same(p.local(0).first(64 << 10), p.remote(0).first(64 << 10)));
  }
  SUBCASE("total: only while nothing is posted") {
    asio::cancellation_signal started, waiting;
    std::vector<std::optional<std::error_code>> results(2);
    p.conn->async_write(std::span(&w[1], 1), asio::bind_cancellation_slot(started.slot(), [&](std::error_code ec) {
                          results[0] = ec;
                        }));
    p.conn->async_write(std::span(&w[2], 1), asio::bind_cancellation_slot(waiting.slot(), [&](std::error_code ec) {
                          results[1] = ec;
                        }));
    started.emit(asio::cancellation_type::total);  // 16 of its WRs are posted: ignored
    waiting.emit(asio::cancellation_type::total);  // none of its WRs is posted: aborted
    REQUIRE(run_until(p.io, [&] { return results[0] && results[1]; }));
    CHECK_FALSE(*results[0]);
    CHECK(same(p.local(1), p.remote(1)));
    CHECK(*results[1] == asio::error::operation_aborted);
    CHECK(all_zero(p.remote(2)));
  }
  SUBCASE("partial, between writes that go on") {
    asio::cancellation_signal signal;
    std::vector<std::optional<std::error_code>> results(3);
    p.conn->async_write(std::span(&w[1], 1), [&](std::error_code ec) { results[0] = ec; });
    p.conn->async_write(std::span(&w[0], 1), asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) {
                          results[1] = ec;
                        }));
    p.conn->async_write(std::span(&w[2], 1), [&](std::error_code ec) { results[2] = ec; });
    signal.emit(asio::cancellation_type::partial);
    REQUIRE(run_until(p.io, [&] { return results[0] && results[1] && results[2]; }));
    CHECK(*results[1] == asio::error::operation_aborted);
    CHECK_FALSE(*results[0]);
    CHECK_FALSE(*results[2]);
    CHECK(same(p.local(1), p.remote(1)));
    CHECK(same(p.local(2), p.remote(2)));
  }
  // Either way: the QPs are still in RTS and the next write lands whole.
  CHECK(p.conn->is_open());
  fill(p.staging, 8);
  auto f = p.conn->async_write(std::span(&w[0], 1), asio::use_future);
  REQUIRE(run_until(p.io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  CHECK_NOTHROW(f.get());
  CHECK(same(p.local(0), p.remote(0)));
  CHECK(p.conn->is_open());
}

TEST_CASE("verbs transport: the receiver sees a sender that went away as peer_disconnected naming it") {
  if (!have_device()) return;
  pair<sv::poll_mode::event> p(sv::options{}, 1 << 20, 4, {2, 0});
  auto w = sl::make_write(p.reg.region(), p.local(0).subspan(0, 64), p.region(0));
  std::optional<sl::notice> got, lost;
  std::optional<std::error_code> notified;
  std::error_code lost_ec;
  p.conn->async_write(std::span(&w, 1), [&](std::error_code ec) { CHECK_FALSE(ec); });
  p.conn->async_notify(sl::notice_kind::commit, 7, [&](std::error_code ec) { notified = ec; });
  p.r.async_wait_notification([&](std::error_code ec, sl::notice n) {
    CHECK_FALSE(ec);
    got = n;
  });
  REQUIRE(run_until(p.io, [&] { return got && notified; }));
  CHECK_FALSE(*notified);
  CHECK(*got == sl::notice{2, sl::notice_kind::commit, 7});
  p.conn.reset();  // the sender's connection is destroyed: its control socket closes
  p.r.async_wait_notification([&](std::error_code ec, sl::notice n) {
    lost_ec = ec;
    lost = n;
  });
  REQUIRE(run_until(p.io, [&] { return lost.has_value(); }));
  CHECK(lost_ec == sl::errc::peer_disconnected);
  CHECK(lost_ec.message() == "peer disconnected");
  CHECK(*lost == sl::notice{2, sl::notice_kind::abort, 0});
}

TEST_CASE("verbs transport: an idle sender learns by itself that its receiver closed") {
  if (!have_device()) return;
  pair<> p(sv::options{}, 4096, 1, {6, 0});
  const auto w = sl::make_write(p.reg.region(), p.local(0), p.region(0));
  p.r.close();
  REQUIRE(run_until(p.io, [&] { return !p.conn->is_open(); }));
  auto f = p.conn->async_write(std::span(&w, 1), asio::use_future);
  auto g = p.conn->async_notify(sl::notice_kind::abort, 1, asio::use_future);
  REQUIRE(run_until(p.io, [&] {
    return f.wait_for(0s) == std::future_status::ready && g.wait_for(0s) == std::future_status::ready;
  }));
  for (auto* fut : {&f, &g}) {
    try {
      fut->get();
      FAIL("an operation on a connection whose receiver closed cannot succeed");
    } catch (const std::system_error& e) {
      CHECK(e.code() == sl::errc::peer_disconnected);
    }
  }
}

TEST_CASE("verbs transport: busy polling moves bytes too") {
  if (!have_device()) return;
  pair<sv::poll_mode::busy> p(sv::options{}, 256 << 10, 2);
  fill(p.staging, 5);
  const auto w = sl::make_write(p.reg.region(), p.local(1), p.region(1));
  bool done = false;
  p.conn->async_write(std::span(&w, 1), [&](std::error_code ec) { CHECK_FALSE(ec); });
  p.conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { CHECK_FALSE(ec); done = true; });
  REQUIRE(run_until(p.io, [&] { return done; }));
  CHECK(same(p.local(1), p.remote(1)));
}

TEST_CASE("verbs transport: a receiver process killed mid-update fails the sender's writes and its notice") {
  if (!have_device()) return;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The receiver: its own io_context and device, serving until it is killed.
    ::close(fds[0]);
    try {
      asio::io_context io;
      sv::verbs_transport t(io.get_executor(), keyed());
      sv::verbs_transport::receiver r(t, listen_endpoint());
      auto arena = r.allocate(16 << 20);
      r.expose("model", arena);
      const unsigned short port = r.local_endpoint().port();
      if (::write(fds[1], &port, sizeof port) != sizeof port) ::_exit(3);
      r.async_accept([](std::error_code, std::uint32_t) {});
      r.async_wait_notification([](std::error_code, sl::notice) {});
      io.run_for(300s);
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  pollfd pfd{fds[0], POLLIN, 0};
  unsigned short port = 0;
  REQUIRE(::poll(&pfd, 1, 60000) == 1);
  REQUIRE(::read(fds[0], &port, sizeof port) == sizeof port);
  ::close(fds[0]);

  asio::io_context io;
  sv::options o;
  o.timeout = 12;  // ~17 ms per try: the bound without the control socket
  sv::verbs_transport t(io.get_executor(), keyed(o));
  std::vector<std::byte> staging(1 << 20);
  auto reg = t.register_memory(staging);
  auto ep = listen_endpoint();
  ep.port(port);
  auto cf = t.async_connect(ep, asio::use_future);
  REQUIRE(run_until(io, [&] { return cf.wait_for(0s) == std::future_status::ready; }));
  auto c = cf.get();
  const auto region = c.remote_regions().regions().at(0);
  std::vector<sl::write_request> w;
  for (std::size_t i = 0; i < 16; ++i)
    w.push_back(sl::make_write(reg.region(), staging, region, i << 20));
  int completed = 0, failed = 0, issued = 0;
  std::error_code first_error;
  std::optional<std::error_code> notified;
  bool killed = false;
  // Keeps 4 writes in flight; kills the receiver after 8 completed and asks for a commit
  // behind the writes still in flight.
  std::function<void()> issue = [&] {
    const int i = issued++;
    c.async_write(std::span(&w[i % 16], 1), [&](std::error_code ec) {
      ++completed;
      if (ec) {
        if (!failed++) first_error = ec;
        return;
      }
      if (completed == 8 && !killed) {
        ::kill(child, SIGKILL);
        killed = true;
        c.async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { notified = ec; });
      }
      if (!failed) issue();
    });
  };
  for (int i = 0; i < 4; ++i) issue();
  REQUIRE(run_until(io, [&] { return failed > 0 && completed == issued && notified; }, 120s));
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(killed);
  CHECK(WIFSIGNALED(status));
  MESSAGE("the sender saw: " << first_error.message());
  CHECK((first_error == sl::errc::peer_disconnected || first_error.category() == sv::wc_category()));
  CHECK(*notified == sl::errc::peer_disconnected);
  CHECK_FALSE(c.is_open());
  // Later operations fail at once too.
  auto later = c.async_notify(sl::notice_kind::abort, 1, asio::use_future);
  REQUIRE(run_until(io, [&] { return later.wait_for(0s) == std::future_status::ready; }));
  try {
    later.get();
    FAIL("a notice to a dead receiver cannot succeed");
  } catch (const std::system_error& e) {
    CHECK(e.code() == sl::errc::peer_disconnected);
  }
}

namespace {
asio::awaitable<void> token_tour(sv::verbs_transport* t, sv::verbs_transport::receiver* r,
                                 std::span<std::byte> staging, std::span<std::byte> arena,
                                 int* steps) {
  // async_accept with deferred, async_connect with use_awaitable.
  r->async_accept(asio::experimental::deferred)([steps](std::error_code ec, std::uint32_t sender) {
    *steps += !ec && sender == 3 ? 1 : 0;
  });
  auto c = co_await t->async_connect(r->local_endpoint(), sl::sender_identity{3, 0}, asio::use_awaitable);
  auto reg = t->register_memory(staging);
  const auto w = sl::make_write(reg.region(), staging, c.remote_regions().regions()[0]);
  // async_write with use_awaitable.
  co_await c.async_write(std::span(&w, 1), asio::use_awaitable);
  *steps += std::memcmp(staging.data(), arena.data(), arena.size()) == 0 ? 2 : 0;
  // async_notify with deferred, async_wait_notification with deferred.
  auto [ec] = co_await c.async_notify(sl::notice_kind::commit, 41, asio::experimental::deferred)(
      asio::experimental::as_tuple(asio::use_awaitable));
  *steps += ec ? 0 : 4;
  auto [wec, n] = co_await r->async_wait_notification(asio::experimental::deferred)(
      asio::experimental::as_tuple(asio::use_awaitable));
  *steps += !wec && n == sl::notice{3, sl::notice_kind::commit, 41} ? 8 : 0;
  *steps += 100;  // the coroutine ran to its end
}
}  // namespace

TEST_CASE("verbs transport: every initiating function takes callbacks, futures, deferred and awaitables") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(64 << 10);
  r.expose("model", arena);
  std::vector<std::byte> staging(arena.size());
  fill(staging, 6);
  int steps = 0;
  auto done = asio::co_spawn(io, token_tour(&t, &r, staging, arena, &steps), asio::use_future);
  REQUIRE(run_until(io, [&] { return done.wait_for(0s) == std::future_status::ready; }));
  CHECK_NOTHROW(done.get());
  CHECK(steps == 115);  // 1 accept, 2 bytes, 4 notify, 8 notice, 100 the end
}

TEST_CASE("verbs transport: a receiver that never answers makes async_connect time out") {
  if (!have_device()) return;
  asio::io_context io;
  sv::options o;
  o.connect_timeout = 300ms;
  sv::verbs_transport t(io.get_executor(), keyed(o));
  // A plain TCP listener: accepts (in the kernel backlog) and never replies.
  asio::ip::tcp::acceptor silent(io, listen_endpoint());
  std::error_code result;
  bool done = false;
  t.async_connect(silent.local_endpoint(), [&](std::error_code ec, sv::verbs_transport::connection c) {
    result = ec;
    done = true;
    CHECK_FALSE(c.is_open());
  });
  REQUIRE(run_until(io, [&] { return done; }));
  CHECK(result == asio::error::timed_out);
}
