// The verbs transport end to end, both peers in this process over the Soft-RoCE device
// (tests/rxe/run), plus a receiver in a forked child that gets killed mid-update.
#include <shardline/verbs/transport.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <asio/write.hpp>

#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <vector>

namespace sl = shardline;
namespace sv = shardline::verbs;
using namespace std::chrono_literals;

namespace {

bool have_device() {
  if (!sv::device_list().empty()) return true;
  std::printf("skipped: no RDMA device (run the verbs suite inside tests/rxe/run)\n");
  return false;
}

asio::ip::tcp::endpoint listen_endpoint() {
  const char* a = std::getenv("RXE_ADDRESS");
  return {asio::ip::make_address(a && *a ? a : "127.0.0.2"), 0};
}

// Runs until `done()`; the bound only keeps a lost completion from hanging the suite.
template <class Done>
bool run_until(asio::io_context& io, Done done, std::chrono::seconds bound = 120s) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  io.restart();
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    io.run_one_for(100ms);
    if (io.stopped()) io.restart();
  }
  return done();
}

void fill(std::span<std::byte> b, unsigned seed) {
  for (std::size_t i = 0; i < b.size(); ++i)
    b[i] = static_cast<std::byte>((i * 131 + seed * 7 + (i >> 8)) & 0xff);
}

// A receiver with one arena and `regions` equal regions, a sender connected to it.
template <sv::poll_mode Mode = sv::poll_mode::adaptive>
struct pair {
  using transport_type = sv::basic_transport<Mode, asio::io_context::executor_type>;
  explicit pair(sv::options o = {}, std::size_t region_bytes = 1 << 20, std::size_t regions = 4)
      : t(io.get_executor(), o), r(t, listen_endpoint()) {
    arena = r.allocate(region_bytes * regions);
    for (std::size_t i = 0; i < regions; ++i)
      r.expose("layer" + std::to_string(i) + ".weight",
               arena.subspan(i * region_bytes, region_bytes));
    staging.resize(region_bytes * regions);
    reg = t.register_memory(staging);
    std::error_code accept_ec, connect_ec;
    bool accepted = false, connected = false;
    r.async_accept([&](std::error_code ec) {
      accept_ec = ec;
      accepted = true;
    });
    t.async_connect(r.local_endpoint(), [&](std::error_code ec, typename transport_type::connection c) {
      connect_ec = ec;
      conn.emplace(std::move(c));
      connected = true;
    });
    REQUIRE(run_until(io, [&] { return accepted && connected; }));
    REQUIRE_FALSE(accept_ec);
    REQUIRE_FALSE(connect_ec);
    REQUIRE(conn->is_open());
    REQUIRE(conn->remote_regions().regions() == r.regions().regions());
  }
  const sl::remote_region& region(std::size_t i) const {
    return conn->remote_regions().regions().at(i);
  }
  std::span<std::byte> local(std::size_t i) {
    const auto n = staging.size() / conn->remote_regions().size();
    return std::span(staging).subspan(i * n, n);
  }
  std::span<std::byte> remote(std::size_t i) {
    const auto n = arena.size() / conn->remote_regions().size();
    return arena.subspan(i * n, n);
  }

  asio::io_context io;
  transport_type t;
  typename transport_type::receiver r;
  std::span<std::byte> arena;
  std::vector<std::byte> staging;
  typename transport_type::registration reg;
  std::optional<typename transport_type::connection> conn;
};

bool same(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace

TEST_CASE("verbs transport: no RDMA device is a clear error at construction") {
  if (!sv::device_list().empty()) return;  // the device suite covers the named case there
  asio::io_context io;
  try {
    sv::transport t(io.get_executor());
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
  // 300 requests of 1..20000 bytes spread over the four regions, plus one 1 MiB write.
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
asio::awaitable<void> send_versions(sv::transport::connection* c, std::vector<sl::write_request> w,
                                    int versions, int* sent) {
  for (int v = 0; v < versions; ++v) {
    co_await c->async_write_notify(std::span(&w[v], 1), static_cast<std::uint32_t>(100 + v),
                                   asio::use_awaitable);
    ++*sent;
  }
}

asio::awaitable<void> receive_versions(sv::transport::receiver* r, std::vector<std::byte>* expect,
                                       std::span<std::byte> arena, std::size_t slot, int versions,
                                       int* received, int* in_order, int* visible) {
  for (int v = 0; v < versions; ++v) {
    const std::uint32_t n = co_await r->async_wait_notification(asio::use_awaitable);
    *in_order += n == static_cast<std::uint32_t>(100 + v);
    // The batch of version v is visible when its notification arrives.
    *visible += std::memcmp(arena.data() + v * slot, expect->data() + v * slot, slot) == 0;
    ++*received;
  }
}
}  // namespace

TEST_CASE("verbs transport: notifications arrive in order, after their batch's bytes") {
  if (!have_device()) return;
  for (std::size_t qps : {std::size_t{1}, std::size_t{3}}) {
    CAPTURE(qps);
    sv::options o;
    o.queue_pairs = qps;
    o.max_write_bytes = 8192;
    const int versions = 16;
    const std::size_t slot = 64 << 10;
    asio::io_context io;
    sv::transport t(io.get_executor(), o);
    sv::transport::receiver r(t, listen_endpoint());
    auto arena = r.allocate(slot * versions);
    r.expose("model", arena);
    std::vector<std::byte> staging(arena.size());
    fill(staging, 3);
    auto reg = t.register_memory(staging);
    auto af = r.async_accept(asio::use_future);
    auto cf = t.async_connect(r.local_endpoint(), asio::use_future);
    REQUIRE(run_until(io, [&] { return cf.wait_for(0s) == std::future_status::ready; }));
    auto c = cf.get();
    REQUIRE(run_until(io, [&] { return af.wait_for(0s) == std::future_status::ready; }));
    af.get();
    std::vector<sl::write_request> w;
    for (int v = 0; v < versions; ++v)
      w.push_back(sl::make_write(reg.region(), std::span(staging).subspan(v * slot, slot),
                                 c.remote_regions().regions()[0], v * slot));
    int sent = 0, received = 0, in_order = 0, visible = 0;
    asio::co_spawn(io, receive_versions(&r, &staging, arena, slot, versions, &received, &in_order, &visible),
                   asio::detached);
    asio::co_spawn(io, send_versions(&c, w, versions, &sent), asio::detached);
    REQUIRE(run_until(io, [&] { return sent == versions && received == versions; }));
    CHECK(in_order == versions);
    CHECK(visible == versions);
  }
}

TEST_CASE("verbs transport: a wrong rkey fails with remote access error and the QP is not reused") {
  if (!have_device()) return;
  sv::options o;
  o.queue_pairs = 1;  // RC order: the sibling is posted behind the failing WR
  pair<> p(o);
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
}

TEST_CASE("verbs transport: a write past the exposed arena is a remote access error naming it") {
  if (!have_device()) return;
  pair<> p(sv::options{}, 64 << 10, 2);
  // Region 1 is the end of the arena; 4 KiB at its last byte overruns the registration.
  auto w = sl::make_write(p.reg.region(), p.local(0).subspan(0, 4096), p.region(1), (64 << 10) - 1);
  auto f = p.conn->async_write(std::span(&w, 1), asio::use_future);
  REQUIRE(run_until(p.io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  try {
    f.get();
    FAIL("a write outside the registered arena should fail");
  } catch (const std::system_error& e) {
    CHECK(e.code().category() == sv::wc_category());
    CHECK(e.code().value() == IBV_WC_REM_ACCESS_ERR);
    const std::string why = sv::describe(p.conn->remote_regions(), w, e.code());
    CHECK(why.find("overrunning region 'layer1.weight'") != std::string::npos);
    CHECK(why.find("remote access error") != std::string::npos);
  }
  CHECK_FALSE(p.conn->is_open());
}

TEST_CASE("verbs transport: cancelling one write releases every outstanding write") {
  if (!have_device()) return;
  sv::options o;
  o.max_write_bytes = 4096;
  o.max_send_wr = 32;
  pair<> p(o, 1 << 20, 4);
  std::vector<sl::write_request> w;
  for (std::size_t i = 0; i < 4; ++i) w.push_back(sl::make_write(p.reg.region(), p.local(i), p.region(i)));
  asio::cancellation_signal signal;
  int done = 0;
  std::vector<std::error_code> results(8);
  for (int i = 0; i < 8; ++i) {
    auto h = [&, i](std::error_code ec) { results[i] = ec; ++done; };
    if (i == 3)
      p.conn->async_write(std::span(&w[i % 4], 1), asio::bind_cancellation_slot(signal.slot(), h));
    else
      p.conn->async_write(std::span(&w[i % 4], 1), h);
  }
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(run_until(p.io, [&] { return done == 8; }));
  CHECK(results[3] == asio::error::operation_aborted);
  for (int i = 0; i < 8; ++i) {
    CAPTURE(i);
    CHECK(results[i]);  // none hangs, none claims success after the QPs went to ERR
  }
  CHECK_FALSE(p.conn->is_open());
}

TEST_CASE("verbs transport: the receiver sees a sender that went away as peer_disconnected") {
  if (!have_device()) return;
  pair<sv::poll_mode::event> p;
  auto w = sl::make_write(p.reg.region(), p.local(0).subspan(0, 64), p.region(0));
  bool got = false, lost = false;
  std::uint32_t value = 0;
  std::error_code lost_ec;
  p.conn->async_write_notify(std::span(&w, 1), 7, [&](std::error_code ec) { REQUIRE_FALSE(ec); });
  p.r.async_wait_notification([&](std::error_code ec, std::uint32_t v) { got = !ec; value = v; });
  REQUIRE(run_until(p.io, [&] { return got; }));
  CHECK(value == 7);
  p.conn.reset();  // the sender's connection is destroyed: its control socket closes
  p.r.async_wait_notification([&](std::error_code ec, std::uint32_t) { lost_ec = ec; lost = true; });
  REQUIRE(run_until(p.io, [&] { return lost; }));
  CHECK(lost_ec == sl::errc::peer_disconnected);
  CHECK(lost_ec.message() == "peer disconnected");
}

TEST_CASE("verbs transport: busy polling moves bytes too") {
  if (!have_device()) return;
  pair<sv::poll_mode::busy> p(sv::options{}, 256 << 10, 2);
  fill(p.staging, 5);
  const auto w = sl::make_write(p.reg.region(), p.local(1), p.region(1));
  bool done = false;
  p.conn->async_write_notify(std::span(&w, 1), 1, [&](std::error_code ec) { CHECK_FALSE(ec); done = true; });
  REQUIRE(run_until(p.io, [&] { return done; }));
  CHECK(same(p.local(1), p.remote(1)));
}

TEST_CASE("verbs transport: a receiver process killed mid-update fails the sender's writes") {
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
      sv::transport t(io.get_executor());
      sv::transport::receiver r(t, listen_endpoint());
      auto arena = r.allocate(16 << 20);
      r.expose("model", arena);
      const unsigned short port = r.local_endpoint().port();
      if (::write(fds[1], &port, sizeof port) != sizeof port) ::_exit(3);
      r.async_accept([](std::error_code) {});
      r.async_wait_notification([](std::error_code, std::uint32_t) {});
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
  o.timeout = 12;  // ~17 ms per try, 4 tries: the bound without the control socket
  sv::transport t(io.get_executor(), o);
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
  bool killed = false;
  // Keeps 4 writes in flight; kills the receiver after 8 completed.
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
      }
      if (!failed) issue();
    });
  };
  for (int i = 0; i < 4; ++i) issue();
  REQUIRE(run_until(io, [&] { return failed > 0 && completed == issued; }, 120s));
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(killed);
  CHECK(WIFSIGNALED(status));
  MESSAGE("the sender saw: " << first_error.message());
  CHECK((first_error == sl::errc::peer_disconnected || first_error.category() == sv::wc_category()));
  CHECK_FALSE(c.is_open());
}

namespace {
asio::awaitable<void> token_tour(sv::transport* t, sv::transport::receiver* r,
                                 std::span<std::byte> staging, std::span<std::byte> arena,
                                 int* steps) {
  // async_accept with deferred, async_connect with use_awaitable.
  r->async_accept(asio::experimental::deferred)([steps](std::error_code ec) { *steps += ec ? 0 : 1; });
  auto c = co_await t->async_connect(r->local_endpoint(), asio::use_awaitable);
  auto reg = t->register_memory(staging);
  const auto w = sl::make_write(reg.region(), staging, c.remote_regions().regions()[0]);
  // async_write with use_awaitable.
  co_await c.async_write(std::span(&w, 1), asio::use_awaitable);
  *steps += std::memcmp(staging.data(), arena.data(), arena.size()) == 0 ? 2 : 0;
  // async_write_notify with deferred, async_wait_notification with deferred.
  auto [ec] = co_await c.async_write_notify(std::span(&w, 1), 41, asio::experimental::deferred)(
      asio::experimental::as_tuple(asio::use_awaitable));
  *steps += ec ? 0 : 4;
  auto [wec, v] = co_await r->async_wait_notification(asio::experimental::deferred)(
      asio::experimental::as_tuple(asio::use_awaitable));
  *steps += !wec && v == 41 ? 8 : 0;
  *steps += 100;  // the coroutine ran to its end
}
}  // namespace

TEST_CASE("verbs transport: every initiating function takes callbacks, futures, deferred and awaitables") {
  if (!have_device()) return;
  asio::io_context io;
  sv::transport t(io.get_executor());
  sv::transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(64 << 10);
  r.expose("model", arena);
  std::vector<std::byte> staging(arena.size());
  fill(staging, 6);
  int steps = 0;
  auto done = asio::co_spawn(io, token_tour(&t, &r, staging, arena, &steps), asio::use_future);
  REQUIRE(run_until(io, [&] { return done.wait_for(0s) == std::future_status::ready; }));
  CHECK_NOTHROW(done.get());
  CHECK(steps == 115);  // 1 accept, 2 bytes, 4 notify, 8 notification, 100 the end
}

TEST_CASE("verbs transport: a malformed hello fails async_accept with protocol_error") {
  if (!have_device()) return;
  asio::io_context io;
  sv::transport t(io.get_executor());
  sv::transport::receiver r(t, listen_endpoint());
  auto accepted = r.async_accept(asio::use_future);
  asio::ip::tcp::socket s(io);
  s.connect(r.local_endpoint());
  const std::string garbage(sv::detail::wire_fixed, 'x');
  asio::write(s, asio::buffer(garbage));
  REQUIRE(run_until(io, [&] { return accepted.wait_for(0s) == std::future_status::ready; }));
  try {
    accepted.get();
    FAIL("garbage must not be accepted");
  } catch (const std::system_error& e) {
    CHECK(e.code() == sl::errc::protocol_error);
    CHECK(std::string(e.what()).find("protocol error") != std::string::npos);
  }
}

TEST_CASE("verbs transport: a receiver that never answers makes async_connect time out") {
  if (!have_device()) return;
  asio::io_context io;
  sv::options o;
  o.connect_timeout = 300ms;
  sv::transport t(io.get_executor(), o);
  // A plain TCP listener: accepts (in the kernel backlog) and never replies.
  asio::ip::tcp::acceptor silent(io, listen_endpoint());
  std::error_code result;
  bool done = false;
  t.async_connect(silent.local_endpoint(), [&](std::error_code ec, sv::transport::connection c) {
    result = ec;
    done = true;
    CHECK_FALSE(c.is_open());
  });
  REQUIRE(run_until(io, [&] { return done; }));
  CHECK(result == asio::error::timed_out);
}
