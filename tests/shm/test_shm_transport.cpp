#include <shardline/shm_transport.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

namespace sl = shardline;
using namespace std::chrono_literals;

namespace {

using clock_type = std::chrono::steady_clock;

std::string socket_path(const char* tag) {
  return "/tmp/shardline-test-" + std::to_string(getpid()) + "-" + tag + ".sock";
}

std::byte pattern(std::size_t i, unsigned seed) {
  return static_cast<std::byte>((i * 131 + seed * 7 + (i >> 12)) & 0xff);
}

std::vector<std::byte> patterned(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = pattern(i, seed);
  return v;
}

bool holds_pattern(std::span<const std::byte> s, unsigned seed) {
  for (std::size_t i = 0; i < s.size(); ++i)
    if (s[i] != pattern(i, seed)) return false;
  return true;
}

bool all_zero(std::span<const std::byte> s) {
  for (auto b : s)
    if (b != std::byte{0}) return false;
  return true;
}

/// Runs handlers until `done()` or the timeout: no test can hang on a lost completion.
template <class Pred>
bool run_until(asio::io_context& io, Pred done, std::chrono::milliseconds timeout = 20s) {
  const auto deadline = clock_type::now() + timeout;
  while (!done() && clock_type::now() < deadline) {
    if (io.stopped()) io.restart();
    io.run_one_for(10ms);
  }
  return done();
}

/// Forks; the child runs `body` (which creates its own io_context) and _exits with its result.
pid_t spawn(const std::function<int()>& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 97;
    try {
      rc = body();
    } catch (...) {
      rc = 98;
    }
    ::_exit(rc);
  }
  return pid;
}

/// The child's exit status; -1 (after killing it) if it did not end within the timeout.
int wait_child(pid_t pid, std::chrono::milliseconds timeout = 30s) {
  const auto deadline = clock_type::now() + timeout;
  int status = 0;
  while (clock_type::now() < deadline) {
    if (::waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(5ms);
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  return -1;
}

/// Connects, retrying while the other process is not listening yet.
template <class Transport>
std::optional<typename Transport::connection> connect(asio::io_context& io, Transport& t,
                                                      const std::string& path) {
  const auto deadline = clock_type::now() + 20s;
  while (clock_type::now() < deadline) {
    std::optional<std::error_code> result;
    std::optional<typename Transport::connection> conn;
    t.async_connect(path, [&](std::error_code ec, typename Transport::connection c) {
      result = ec;
      if (!ec) conn.emplace(std::move(c));
    });
    if (!run_until(io, [&] { return result.has_value(); })) return std::nullopt;
    if (!*result) return conn;
    std::this_thread::sleep_for(10ms);
  }
  return std::nullopt;
}

/// A receiver process body: one arena, regions named by `layout` (name, offset, bytes);
/// `on_notification(value, arena)` returns an exit status, or -1 to keep waiting.
struct region_spec {
  std::string name;
  std::size_t offset, bytes;
};
int serve(const std::string& path, std::size_t arena_bytes, std::vector<region_spec> layout,
          std::function<int(std::error_code, std::uint32_t, std::span<std::byte>)> on_notification,
          std::chrono::milliseconds timeout = 30s) {
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto arena = r.allocate(arena_bytes);
  for (const auto& s : layout) r.expose(s.name, arena.subspan(s.offset, s.bytes));
  std::optional<std::error_code> accepted;
  r.async_accept([&](std::error_code ec) { accepted = ec; });
  if (!run_until(io, [&] { return accepted.has_value(); }, timeout)) return 90;
  if (*accepted) return 91;
  for (;;) {
    std::optional<int> verdict;
    r.async_wait_notification([&](std::error_code ec, std::uint32_t v) {
      const int rc = on_notification(ec, v, arena);
      verdict = rc;
    });
    if (!run_until(io, [&] { return verdict.has_value(); }, timeout)) return 92;
    if (*verdict >= 0) return *verdict;
  }
}

struct completion_log {
  std::vector<std::error_code> codes;
  auto handler() {
    return [this](std::error_code ec) { codes.push_back(ec); };
  }
};

}  // namespace

TEST_CASE("shm_transport: a batch lands in the receiver process byte for byte") {
  const auto path = socket_path("bytes");
  const std::size_t a_bytes = (1 << 20) + 3, b_bytes = (2 << 20) + 777;
  const pid_t child = spawn([&] {
    return serve(path, a_bytes + b_bytes + 5, {{"a", 0, a_bytes}, {"b", a_bytes + 5, b_bytes}},
                 [&](std::error_code ec, std::uint32_t v, std::span<std::byte> arena) {
                   if (ec || v != 7) return 10;
                   if (!holds_pattern(arena.subspan(0, a_bytes), 1)) return 11;
                   if (!all_zero(arena.subspan(a_bytes, 5))) return 12;
                   if (!holds_pattern(arena.subspan(a_bytes + 5, b_bytes), 2)) return 13;
                   return 0;
                 });
  });
  {
    asio::io_context io;
    sl::shm_options o;
    o.chunk_bytes = 64 << 10;  // many pieces over both workers
    sl::shm_transport t(io.get_executor(), o);
    auto conn = connect(io, t, path);
    REQUIRE(conn);
    CHECK(conn->is_open());
    const auto& table = conn->remote_regions();
    REQUIRE(table.size() == 2);
    const auto* a = table.find("a");
    const auto* b = table.find("b");
    REQUIRE(a);
    REQUIRE(b);
    CHECK(a->length == a_bytes);
    CHECK(b->length == b_bytes);
    auto src_a = patterned(a_bytes, 1), src_b = patterned(b_bytes, 2);
    auto reg = t.register_memory(src_a);
    CHECK(reg.region().size == a_bytes);
    std::vector<sl::write_request> batch{
        sl::make_write(reg.region(), src_a, *a),
        {src_b, 0, b->address, 0},
    };
    std::optional<std::error_code> done;
    conn->async_write_notify(batch, 7, [&](std::error_code ec) { done = ec; });
    REQUIRE(run_until(io, [&] { return done.has_value(); }));
    CHECK(*done == std::error_code{});
    CHECK(wait_child(child) == 0);
  }
}

TEST_CASE("shm_transport: the other process can be the sender (data the other way)") {
  const auto path = socket_path("reverse");
  const std::size_t bytes = (3 << 20) + 11;
  const pid_t child = spawn([&] {
    asio::io_context io;
    sl::shm_transport t(io.get_executor());
    auto conn = connect(io, t, path);
    if (!conn) return 20;
    const auto* r = conn->remote_regions().find("weights");
    if (!r || r->length != bytes) return 21;
    auto src = patterned(bytes, 5);
    std::vector<sl::write_request> batch{{src, 0, r->address, 0}};
    std::optional<std::error_code> done;
    conn->async_write_notify(batch, 42, [&](std::error_code ec) { done = ec; });
    if (!run_until(io, [&] { return done.has_value(); })) return 22;
    return *done ? 23 : 0;
  });
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto arena = r.allocate(bytes + 100);
  r.expose("weights", arena.subspan(50, bytes));
  auto serve_one = [](sl::shm_transport::receiver& r) -> asio::awaitable<std::uint32_t> {
    co_await r.async_accept(asio::use_awaitable);
    co_return co_await r.async_wait_notification(asio::use_awaitable);
  };
  auto f = asio::co_spawn(io, serve_one(r), asio::use_future);
  REQUIRE(run_until(io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  CHECK(f.get() == 42);
  CHECK(holds_pattern(arena.subspan(50, bytes), 5));
  CHECK(all_zero(arena.subspan(0, 50)));
  CHECK(all_zero(arena.subspan(50 + bytes)));
  CHECK(wait_child(child) == 0);
  // The sender exited: the next wait learns that it is gone.
  auto [ec, v] = [&] {
    std::optional<std::pair<std::error_code, std::uint32_t>> out;
    r.async_wait_notification([&](std::error_code ec, std::uint32_t v) { out.emplace(ec, v); });
    run_until(io, [&] { return out.has_value(); });
    return out.value_or(std::pair{std::error_code{}, 0u});
  }();
  CHECK(ec == sl::errc::peer_disconnected);
  (void)v;
}

TEST_CASE("shm_transport: notifications arrive in order, each after its batch's bytes") {
  const auto path = socket_path("order");
  constexpr std::uint32_t count = 24;
  const std::size_t part = 256 << 10;
  std::vector<region_spec> layout;
  for (std::uint32_t k = 1; k <= count; ++k) layout.push_back({"p" + std::to_string(k), (k - 1) * part, part});
  const pid_t child = spawn([&] {
    std::uint32_t expected = 1;
    return serve(path, count * part, layout,
                 [&](std::error_code ec, std::uint32_t v, std::span<std::byte> arena) {
                   if (ec) return 30;
                   if (v != expected) return 31;
                   // batch k wrote part k; the sender may already be copying k+1
                   for (std::uint32_t k = 1; k <= v; ++k)
                     for (auto b : arena.subspan((k - 1) * part, part))
                       if (b != std::byte(k)) return 32;
                   return ++expected > count ? 0 : -1;
                 });
  });
  {
    asio::io_context io;
    sl::shm_options o;
    o.chunk_bytes = 16 << 10;
    sl::shm_transport t(io.get_executor(), o);
    auto conn = connect(io, t, path);
    REQUIRE(conn);
    std::vector<std::vector<std::byte>> sources;
    std::vector<std::vector<sl::write_request>> batches;
    sources.reserve(count);  // the batches point into them
    for (std::uint32_t k = 1; k <= count; ++k) {
      sources.emplace_back(part, std::byte(k));
      const auto* r = conn->remote_regions().find("p" + std::to_string(k));
      REQUIRE(r);
      batches.push_back({{sources.back(), 0, r->address, 0}});
    }
    completion_log log;
    for (std::uint32_t k = 1; k <= count; ++k)
      conn->async_write_notify(batches[k - 1], k, log.handler());
    REQUIRE(run_until(io, [&] { return log.codes.size() == count; }));
    for (auto ec : log.codes) CHECK(ec == std::error_code{});
    CHECK(wait_child(child) == 0);
  }
}

TEST_CASE("shm_transport: a write outside the exposed regions fails the whole batch, nothing written") {
  const auto path = socket_path("outside");
  const std::size_t arena = 2 << 20, exposed = 1 << 20;
  const pid_t child = spawn([&] {
    return serve(path, arena, {{"model.layers.0.qkv_proj.weight", 0, exposed}},
                 [&](std::error_code ec, std::uint32_t v, std::span<std::byte> a) {
                   if (ec || v != 1) return 40;
                   return all_zero(a) ? 0 : 41;
                 });
  });
  {
    asio::io_context io;
    sl::shm_transport t(io.get_executor());
    auto conn = connect(io, t, path);
    REQUIRE(conn);
    const auto& region = *conn->remote_regions().find("model.layers.0.qkv_proj.weight");
    auto src = patterned(exposed, 3);
    const std::span<const std::byte> all(src), some = all.first(4096);
    const std::vector<std::vector<sl::write_request>> bad{
        // valid first request, then one just past the region (still inside the arena)
        {{all, 0, region.address, 0}, {some.first(16), 0, region.address + exposed, 0}},
        // starts inside and runs over the end
        {{some, 0, region.address + exposed - 100, 0}},
        // nowhere near any region
        {{some, 0, 0x1000, 0}},
        // one byte before the region
        {{some.first(1), 0, region.address - 1, 0}},
    };
    completion_log log;
    for (const auto& b : bad) conn->async_write(b, log.handler());
    REQUIRE(run_until(io, [&] { return log.codes.size() == bad.size(); }));
    for (auto ec : log.codes) {
      CHECK(ec == sl::errc::region_not_exposed);
      CHECK(ec.message().find("outside every exposed region") != std::string::npos);
    }
    CHECK(conn->is_open());  // a refused batch leaves the link usable
    std::optional<std::error_code> done;
    conn->async_write_notify({}, 1, [&](std::error_code ec) { done = ec; });
    REQUIRE(run_until(io, [&] { return done.has_value(); }));
    CHECK(*done == std::error_code{});
    CHECK(wait_child(child) == 0);
  }
}

TEST_CASE("shm_transport: receiver SIGKILLed mid-update fails every pending write with peer_disconnected") {
  const auto path = socket_path("kill");
  const std::size_t bytes = 32 << 20;
  const pid_t child = spawn([&] {
    return serve(path, bytes, {{"w", 0, bytes}},
                 [](std::error_code, std::uint32_t, std::span<std::byte>) { return -1; });
  });
  asio::io_context io;
  sl::shm_options o;
  o.chunk_bytes = 1 << 20;
  sl::shm_transport t(io.get_executor(), o);
  auto conn = connect(io, t, path);
  REQUIRE(conn);
  const auto& w = *conn->remote_regions().find("w");
  auto src = patterned(bytes, 9);
  std::vector<sl::write_request> batch{{src, 0, w.address, 0}};
  constexpr std::size_t n = 24;
  std::vector<std::error_code> codes;
  bool killed = false;
  for (std::size_t i = 0; i < n; ++i)
    conn->async_write_notify(batch, static_cast<std::uint32_t>(i), [&](std::error_code ec) {
      codes.push_back(ec);
      if (!killed) {  // the first write landed: the rest are queued or copying
        killed = true;
        ::kill(child, SIGKILL);
      }
    });
  REQUIRE(run_until(io, [&] { return codes.size() == n; }));
  CHECK(wait_child(child) == 128 + SIGKILL);
  std::size_t ok = 0, gone = 0;
  for (auto ec : codes) {
    if (!ec) ++ok;
    else if (ec == sl::errc::peer_disconnected) ++gone;
    else FAIL("unexpected completion: " << ec.message());
  }
  CHECK(ok >= 1);
  CHECK(gone >= n - 3);  // at most the writes already done by the time EOF is read
  CHECK(ok + gone == n);
  CHECK(codes.back() == sl::errc::peer_disconnected);
  CHECK_FALSE(conn->is_open());
  std::optional<std::error_code> later;
  conn->async_write(batch, [&](std::error_code ec) { later = ec; });
  REQUIRE(run_until(io, [&] { return later.has_value(); }));
  CHECK(*later == sl::errc::peer_disconnected);
  CHECK(later->message() == "peer disconnected");
}

TEST_CASE("shm_transport: connecting to a missing or dead socket fails at once, a mute one times out") {
  asio::io_context io;
  sl::shm_options o;
  o.connect_timeout = 300ms;
  sl::shm_transport t(io.get_executor(), o);
  auto attempt = [&](const std::string& path) {
    std::optional<std::error_code> result;
    bool open = true;
    t.async_connect(path, [&](std::error_code ec, sl::shm_transport::connection c) {
      result = ec;
      open = c.is_open();
    });
    REQUIRE(run_until(io, [&] { return result.has_value(); }));
    CHECK_FALSE(open);
    return *result;
  };
  SUBCASE("nobody ever listened") {
    CHECK(attempt(socket_path("missing")) == std::errc::no_such_file_or_directory);
  }
  SUBCASE("a stale socket file with no listener") {
    const auto path = socket_path("stale");
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    ::close(fd);
    CHECK(attempt(path) == std::errc::connection_refused);
    ::unlink(path.c_str());
  }
  SUBCASE("a path too long for a Unix socket") {
    CHECK(attempt("/tmp/" + std::string(200, 'x')) == sl::errc::invalid_argument);
  }
  SUBCASE("a listener that never accepts: connect_timeout") {
    sl::shm_transport::receiver mute(io.get_executor(), socket_path("mute"));
    CHECK(attempt(socket_path("mute")) == std::errc::timed_out);
  }
  SUBCASE("a connect cancelled through its slot completes with operation_aborted") {
    sl::shm_transport::receiver mute(io.get_executor(), socket_path("mute2"));
    asio::cancellation_signal signal;
    std::optional<std::error_code> result;
    t.async_connect(socket_path("mute2"),
                    asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec, sl::shm_transport::connection) {
                      result = ec;
                    }));
    io.restart();
    io.poll();  // connected to the backlog, waiting for the handshake
    signal.emit(asio::cancellation_type::terminal);
    REQUIRE(run_until(io, [&] { return result.has_value(); }));
    CHECK(*result == asio::error::operation_aborted);
  }
}

TEST_CASE("shm_transport: async_accept is cancellable and fails after close()") {
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), socket_path("accept"));
  asio::cancellation_signal signal;
  std::optional<std::error_code> result;
  r.async_accept(asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) { result = ec; }));
  io.poll();
  CHECK_FALSE(result.has_value());
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(run_until(io, [&] { return result.has_value(); }));
  CHECK(*result == asio::error::operation_aborted);
  r.close();
  result.reset();
  r.async_accept([&](std::error_code ec) { result = ec; });
  CHECK_FALSE(result.has_value());  // never inline
  REQUIRE(run_until(io, [&] { return result.has_value(); }));
  CHECK(*result == sl::errc::not_connected);
  std::optional<std::error_code> waited;
  r.async_wait_notification([&](std::error_code ec, std::uint32_t) { waited = ec; });
  REQUIRE(run_until(io, [&] { return waited.has_value(); }));
  CHECK(*waited == sl::errc::not_connected);
}

TEST_CASE("shm_transport: receiver errors name the region or socket path and the cause") {
  asio::io_context io;
  SUBCASE("expose outside every arena") {
    sl::shm_transport::receiver r(io.get_executor(), socket_path("expose"));
    auto arena = r.allocate(4096);
    std::vector<std::byte> elsewhere(64);
    try {
      r.expose("model.norm.weight", elsewhere);
      FAIL("expose did not throw");
    } catch (const sl::error& e) {
      CHECK(e.code() == sl::errc::invalid_argument);
      CHECK(std::string(e.what()).find("'model.norm.weight' is not inside an allocated arena") !=
            std::string::npos);
    }
    // straddling the arena's end is outside too
    CHECK_THROWS_AS(r.expose("tail", std::span(arena.data() + 4000, 200)), sl::error);
    r.expose("ok", arena.subspan(0, 100));
    CHECK(r.regions().size() == 1);
  }
  SUBCASE("a socket path in a missing directory") {
    const std::string path = "/tmp/shardline-no-such-dir-" + std::to_string(getpid()) + "/x.sock";
    try {
      sl::shm_transport::receiver r(io.get_executor(), path);
      FAIL("no throw");
    } catch (const sl::error& e) {
      CHECK(e.code() == std::errc::no_such_file_or_directory);
      CHECK(std::string(e.what()).find("cannot bind socket '" + path + "'") != std::string::npos);
    }
  }
  SUBCASE("a socket path too long") {
    const std::string path = "/tmp/" + std::string(120, 'y');
    try {
      sl::shm_transport::receiver r(io.get_executor(), path);
      FAIL("no throw");
    } catch (const sl::error& e) {
      CHECK(e.code() == sl::errc::invalid_argument);
      CHECK(std::string(e.what()).find(path) != std::string::npos);
      CHECK(std::string(e.what()).find("must be 1 to 107 bytes") != std::string::npos);
    }
  }
  SUBCASE("an empty arena") {
    sl::shm_transport::receiver r(io.get_executor(), socket_path("empty"));
    try {
      (void)r.allocate(0);
      FAIL("no throw");
    } catch (const sl::error& e) {
      CHECK(e.code() == sl::errc::invalid_argument);
      CHECK(std::string(e.what()).find("cannot be empty") != std::string::npos);
    }
  }
}

TEST_CASE("shm_transport: a cancelled queued write copies nothing; close() aborts, then not_connected") {
  const auto path = socket_path("cancel");
  const std::size_t part = 16 << 20;
  const pid_t child = spawn([&] {
    return serve(path, 3 * part, {{"a", 0, part}, {"b", part, part}, {"c", 2 * part, part}},
                 [&](std::error_code ec, std::uint32_t v, std::span<std::byte> arena) {
                   if (ec || v != 1) return 50;
                   if (!holds_pattern(arena.subspan(0, part), 4)) return 51;
                   if (!holds_pattern(arena.subspan(part, part), 4)) return 52;
                   return all_zero(arena.subspan(2 * part)) ? 0 : 53;
                 });
  });
  asio::io_context io;
  sl::shm_transport t(io.get_executor());
  auto conn = connect(io, t, path);
  REQUIRE(conn);
  const auto& table = conn->remote_regions();
  auto src = patterned(part, 4);
  std::vector<sl::write_request> wa{{src, 0, table.find("a")->address, 0}};
  std::vector<sl::write_request> wb{{src, 0, table.find("b")->address, 0}};
  std::vector<sl::write_request> wc{{src, 0, table.find("c")->address, 0}};
  completion_log log;
  asio::cancellation_signal signal;
  conn->async_write(wa, log.handler());
  conn->async_write(wb, log.handler());
  conn->async_write(wc, asio::bind_cancellation_slot(signal.slot(), log.handler()));
  signal.emit(asio::cancellation_type::terminal);  // c has not started: a is copying
  std::optional<std::error_code> notified;
  conn->async_write_notify({}, 1, [&](std::error_code ec) { notified = ec; });
  REQUIRE(run_until(io, [&] { return notified.has_value() && log.codes.size() == 3; }));
  CHECK(*notified == std::error_code{});
  REQUIRE(log.codes.size() == 3);
  // c completes first: aborted before it started
  CHECK(log.codes[0] == asio::error::operation_aborted);
  CHECK(log.codes[1] == std::error_code{});
  CHECK(log.codes[2] == std::error_code{});
  CHECK(wait_child(child) == 0);

  // Now close() with writes queued and copying; the receiver has exited, but the memory is
  // still mapped here, so the copying one runs to its end.
  log.codes.clear();
  if (conn->is_open()) {  // EOF of the exited child may already have been read
    for (int i = 0; i < 4; ++i) conn->async_write(wa, log.handler());
    conn->close();
    REQUIRE(run_until(io, [&] { return log.codes.size() == 4; }));
    for (auto ec : log.codes) CHECK(ec == asio::error::operation_aborted);
  }
  conn->close();
  CHECK_FALSE(conn->is_open());
  std::optional<std::error_code> later;
  conn->async_write(wa, [&](std::error_code ec) { later = ec; });
  REQUIRE(run_until(io, [&] { return later.has_value(); }));
  CHECK(*later == sl::errc::not_connected);
}

TEST_CASE("shm_transport: close() aborts queued and copying writes on a live link") {
  const auto path = socket_path("close");
  const std::size_t bytes = 32 << 20;
  const pid_t child = spawn([&] {
    return serve(path, bytes, {{"w", 0, bytes}}, [](std::error_code ec, std::uint32_t, std::span<std::byte>) {
      return ec == sl::errc::peer_disconnected ? 0 : 60;  // the sender closed: we see it
    });
  });
  asio::io_context io;
  sl::shm_options o;
  o.chunk_bytes = 1 << 20;
  sl::shm_transport t(io.get_executor(), o);
  auto conn = connect(io, t, path);
  REQUIRE(conn);
  auto src = patterned(bytes, 1);
  std::vector<sl::write_request> batch{{src, 0, conn->remote_regions().find("w")->address, 0}};
  completion_log log;
  for (int i = 0; i < 5; ++i) conn->async_write(batch, log.handler());
  conn->close();
  REQUIRE(run_until(io, [&] { return log.codes.size() == 5; }));
  for (auto ec : log.codes) CHECK(ec == asio::error::operation_aborted);
  CHECK(wait_child(child) == 0);
}

namespace {
asio::awaitable<void> awaited_write(sl::shm_transport::connection& c, std::vector<sl::write_request> batch,
                                    std::uint32_t notification) {
  co_await c.async_write_notify(batch, notification, asio::use_awaitable);
}
}  // namespace

TEST_CASE("shm_transport: callback, use_future, deferred and use_awaitable all complete") {
  const auto path = socket_path("tokens");
  const std::size_t part = 1 << 20;
  const pid_t child = spawn([&] {
    return serve(path, 4 * part, {{"cb", 0, part}, {"fut", part, part}, {"def", 2 * part, part}, {"aw", 3 * part, part}},
                 [&](std::error_code ec, std::uint32_t v, std::span<std::byte> arena) {
                   if (ec || v != 4) return 70;
                   for (unsigned i = 0; i < 4; ++i)
                     if (!holds_pattern(arena.subspan(i * part, part), 20 + i)) return 71 + int(i);
                   return 0;
                 });
  });
  asio::io_context io;
  sl::shm_transport t(io.get_executor());
  std::optional<sl::shm_transport::connection> conn;
  for (int attempt = 0; !conn && attempt < 2000; ++attempt) {
    auto f = t.async_connect(path, asio::use_future);
    REQUIRE(run_until(io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
    try {
      conn.emplace(f.get());
    } catch (const std::system_error&) {
      std::this_thread::sleep_for(10ms);
    }
  }
  REQUIRE(conn);
  const auto& table = conn->remote_regions();
  std::vector<std::vector<std::byte>> src;
  std::vector<std::vector<sl::write_request>> b;
  src.reserve(4);  // the batches point into them
  for (unsigned i = 0; i < 4; ++i) {
    src.push_back(patterned(part, 20 + i));
    b.push_back({{src.back(), 0, table.regions()[i].address, 0}});
  }
  std::optional<std::error_code> by_callback;
  conn->async_write(b[0], [&](std::error_code ec) { by_callback = ec; });
  auto future = conn->async_write(b[1], asio::use_future);
  std::optional<std::error_code> by_deferred;
  auto deferred = conn->async_write(b[2], asio::experimental::deferred);
  REQUIRE(run_until(io, [&] { return by_callback && future.wait_for(0s) == std::future_status::ready; }));
  CHECK(*by_callback == std::error_code{});
  CHECK_NOTHROW(future.get());
  std::move(deferred)([&](std::error_code ec) { by_deferred = ec; });
  REQUIRE(run_until(io, [&] { return by_deferred.has_value(); }));
  CHECK(*by_deferred == std::error_code{});
  auto awaited = asio::co_spawn(io, awaited_write(*conn, b[3], 4), asio::use_future);
  REQUIRE(run_until(io, [&] { return awaited.wait_for(0s) == std::future_status::ready; }));
  CHECK_NOTHROW(awaited.get());
  CHECK(wait_child(child) == 0);

  // An error reaches the coroutine as an exception carrying the code.
  conn->close();
  auto failed = asio::co_spawn(io, awaited_write(*conn, b[3], 5), asio::use_future);
  REQUIRE(run_until(io, [&] { return failed.wait_for(0s) == std::future_status::ready; }));
  try {
    failed.get();
    FAIL("no exception");
  } catch (const std::system_error& e) {
    CHECK(e.code() == sl::errc::not_connected);
  }
}
