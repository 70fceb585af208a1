#include <shardline/transport/shm/transport.hpp>

#include <shardline/detail/codec.hpp>
#include <shardline/transport/detail/control.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/channel_error.hpp>
#include <asio/experimental/deferred.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "shm_support.hpp"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

namespace sl = shardline;
using namespace std::chrono_literals;

namespace {

using namespace shm_test;
using clock_type = std::chrono::steady_clock;
using connection = sl::shm_transport::connection;

std::string socket_path(const char* tag) {
  return "/tmp/shardline-test-" + std::to_string(getpid()) + "-" + tag + ".sock";
}

bool all_zero(std::span<const std::byte> s) {
  for (auto b : s)
    if (b != std::byte{0}) return false;
  return true;
}

/// Runs handlers for `d`: only to give something that must NOT happen the chance to.
void run_for(asio::io_context& io, std::chrono::milliseconds d) {
  run_until(io, [] { return false; }, d);
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

/// One connect attempt: its code and, on success, the connection.
std::pair<std::error_code, std::optional<connection>> connect_once(asio::io_context& io, sl::shm_transport& t,
                                                                   const std::string& path,
                                                                   sl::sender_identity who = {}) {
  outcome<std::error_code, connection> done;
  t.async_connect(path, who, done.handler());
  if (!run_until(io, [&] { return done.ready(); })) return {std::make_error_code(std::errc::timed_out), std::nullopt};
  auto& [ec, c] = done.get();
  if (ec) return {ec, std::nullopt};
  return {ec, std::move(c)};
}

/// Connects, retrying only while the other process is not listening yet.
std::optional<connection> connect(asio::io_context& io, sl::shm_transport& t, const std::string& path,
                                  sl::sender_identity who = {}) {
  const auto deadline = clock_type::now() + 20s;
  while (clock_type::now() < deadline) {
    auto [ec, c] = connect_once(io, t, path, who);
    if (!ec) return std::move(c);
    if (ec != std::errc::no_such_file_or_directory && ec != std::errc::connection_refused) return std::nullopt;
    std::this_thread::sleep_for(10ms);
  }
  return std::nullopt;
}

struct event {
  std::error_code ec;
  sl::notice n;
};

/// The receiver's next notice, or nullopt when none came within the hang guard.
std::optional<event> next_notice(asio::io_context& io, sl::shm_transport::receiver& r) {
  outcome<std::error_code, sl::notice> got;
  r.async_wait_notification(got.handler());
  if (!run_until(io, [&] { return got.ready(); })) return std::nullopt;
  auto& [ec, n] = got.get();
  return event{ec, n};
}

/// A receiver process body: one arena, regions named by `layout` (name, offset, bytes);
/// `on_notice(code, notice, arena)` returns an exit status, or -1 to keep waiting.
struct region_spec {
  std::string name;
  std::size_t offset, bytes;
};
int serve(const std::string& path, std::size_t arena_bytes, std::vector<region_spec> layout,
          std::function<int(std::error_code, sl::notice, std::span<std::byte>)> on_notice,
          sl::shm_options options = {}, std::chrono::milliseconds timeout = 30s) {
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path, options);
  auto arena = r.allocate(arena_bytes);
  for (const auto& s : layout) r.expose(s.name, arena.subspan(s.offset, s.bytes));
  outcome<std::error_code, std::uint32_t> accepted;
  r.async_accept(accepted.handler());
  if (!run_until(io, [&] { return accepted.ready(); }, timeout)) return 90;
  if (accepted.code()) return 91;
  for (;;) {
    outcome<std::error_code, sl::notice> got;
    r.async_wait_notification(got.handler());
    if (!run_until(io, [&] { return got.ready(); }, timeout)) return 92;
    auto& [ec, n] = got.get();
    const int rc = on_notice(ec, n, arena);
    if (rc >= 0) return rc;
  }
}

struct completion_log {
  std::vector<std::error_code> codes;
  auto handler() {
    return [this](std::error_code ec) { codes.push_back(ec); };
  }
};

/// The shardline::error `f` throws (its code and what()), or nothing.
std::optional<std::pair<std::error_code, std::string>> thrown_by(const std::function<void()>& f) {
  try {
    f();
  } catch (const sl::error& e) {
    return std::pair{e.code(), std::string(e.what())};
  }
  return std::nullopt;
}

// ---- raw peers: speak the wire format by hand, to send what a real peer never would ----

int raw_client(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, path.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  timeval guard{20, 0};  // a read that never gets its bytes fails instead of hanging
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard);
  return fd;
}

/// Reads until end of file: what the peer sent (drops any descriptors). nullopt on error.
std::optional<std::string> raw_read_to_end(int fd) {
  std::string all;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n == 0) return all;
    if (n < 0) return std::nullopt;
    all.append(buf, static_cast<std::size_t>(n));
  }
}

std::error_code verdict_in(const std::string& bytes) {
  REQUIRE(bytes.size() >= sl::detail::verdict_bytes);
  std::array<std::byte, sl::detail::verdict_bytes> v{};
  std::memcpy(v.data(), bytes.data(), v.size());
  return sl::detail::decode_verdict(v);
}

sl::detail::hello_frame hello_with(std::string_view magic, std::uint32_t protocol, std::uint32_t sender) {
  std::string s(magic);
  sl::detail::put_le<std::uint32_t>(s, protocol);
  sl::detail::put_le<std::uint32_t>(s, sender);
  sl::detail::put_le<std::uint64_t>(s, 0);
  sl::detail::hello_frame f{};
  std::memcpy(f.data(), s.data(), f.size());
  return f;
}

/// A hand-written receiver on a thread: admits one sender, hands it one memfd arena of
/// `arena_bytes` claimed to sit at `base` and the region table `table`, then answers the
/// first notice with `ack` and waits for the sender to leave.
class fake_receiver {
public:
  fake_receiver(const std::string& path, std::uint64_t base, std::size_t arena_bytes, sl::region_table table,
                sl::detail::notice_frame ack)
      : path_(path) {
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ::unlink(path.c_str());
    REQUIRE(::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener_, 4) == 0);
    thread_ = std::thread([this, base, arena_bytes, table = std::move(table), ack] {
      const int fd = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;
      timeval guard{20, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard);
      sl::detail::hello_frame hello{};
      if (::recv(fd, hello.data(), hello.size(), MSG_WAITALL) != static_cast<ssize_t>(hello.size())) return;
      raw_send(fd, sl::detail::encode_verdict({}));
      sl::detail::unique_fd arena(::memfd_create("fake-arena", MFD_CLOEXEC | MFD_ALLOW_SEALING));
      if (::ftruncate(arena.get(), static_cast<off_t>(arena_bytes)) != 0) return;
      if (::fcntl(arena.get(), F_ADD_SEALS, sl::detail::arena_seals) != 0) return;  // senders refuse unsealed arenas
      std::string payload;
      sl::detail::put_le<std::uint64_t>(payload, base);
      sl::detail::put_le<std::uint64_t>(payload, arena_bytes);
      payload += table.serialize();
      std::string header = "SLSH";
      sl::detail::put_le<std::uint32_t>(header, 1);
      sl::detail::put_le<std::uint64_t>(header, payload.size());
      const int fds[] = {arena.get()};
      if (sl::detail::send_with_fds(fd, std::as_bytes(std::span(header)), fds)) return;
      raw_send(fd, std::as_bytes(std::span(payload)));
      sl::detail::notice_frame got{};
      if (::recv(fd, got.data(), got.size(), MSG_WAITALL) == static_cast<ssize_t>(got.size())) raw_send(fd, ack);
      (void)raw_read_to_end(fd);
      ::close(fd);
    });
  }
  ~fake_receiver() {
    ::shutdown(listener_, SHUT_RDWR);  // ends an accept that nobody answered
    thread_.join();
    ::close(listener_);
    ::unlink(path_.c_str());
  }

private:
  std::string path_;
  int listener_ = -1;
  std::thread thread_;
};

}  // namespace

// ---- data path --------------------------------------------------------------------------

TEST_CASE("shm_transport: a batch lands in the receiver process byte for byte") {
  const auto path = socket_path("bytes");
  const std::size_t a_bytes = (1 << 20) + 3, b_bytes = (2 << 20) + 777;
  const pid_t child = spawn([&] {
    return serve(path, a_bytes + b_bytes + 5, {{"a", 0, a_bytes}, {"b", a_bytes + 5, b_bytes}},
                 [&](std::error_code ec, sl::notice n, std::span<std::byte> arena) {
                   if (ec || n != sl::notice{0, sl::notice_kind::commit, 7}) return 10;
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
    CHECK(conn->identity().sender == 0);
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
    completion_log log;
    conn->async_write(batch, log.handler());
    conn->async_notify(sl::notice_kind::commit, 7, log.handler());
    REQUIRE(run_until(io, [&] { return log.codes.size() == 2; }));
    CHECK(log.codes[0] == std::error_code{});
    CHECK(log.codes[1] == std::error_code{});
    CHECK(wait_child(child) == 0);
  }
}

TEST_CASE("shm_transport: the sender can be the other process; its exit reaches the receiver as peer_disconnected naming it") {
  const auto path = socket_path("reverse");
  const std::size_t bytes = (3 << 20) + 11;
  const pid_t child = spawn([&] {
    asio::io_context io;
    sl::shm_transport t(io.get_executor());
    auto conn = connect(io, t, path, {3, 0});
    if (!conn) return 20;
    const auto* r = conn->remote_regions().find("weights");
    if (!r || r->length != bytes) return 21;
    auto src = patterned(bytes, 5);
    std::vector<sl::write_request> batch{{src, 0, r->address, 0}};
    completion_log log;
    conn->async_write(batch, log.handler());
    conn->async_notify(sl::notice_kind::commit, 42, log.handler());
    if (!run_until(io, [&] { return log.codes.size() == 2; })) return 22;
    return log.codes[0] || log.codes[1] ? 23 : 0;
  });
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto arena = r.allocate(bytes + 100);
  r.expose("weights", arena.subspan(50, bytes));
  auto serve_one = [](sl::shm_transport::receiver& r) -> asio::awaitable<std::pair<std::uint32_t, sl::notice>> {
    const std::uint32_t who = co_await r.async_accept(asio::use_awaitable);
    co_return std::pair{who, co_await r.async_wait_notification(asio::use_awaitable)};
  };
  auto f = asio::co_spawn(io, serve_one(r), asio::use_future);
  REQUIRE(run_until(io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  const auto [who, n] = f.get();
  CHECK(who == 3);
  CHECK(n == sl::notice{3, sl::notice_kind::commit, 42});
  CHECK(holds_pattern(arena.subspan(50, bytes), 5));
  CHECK(all_zero(arena.subspan(0, 50)));
  CHECK(all_zero(arena.subspan(50 + bytes)));
  CHECK(wait_child(child) == 0);
  // The sender exited: the receiver learns it, with the sender's id.
  auto gone = next_notice(io, r);
  REQUIRE(gone);
  CHECK(gone->ec == sl::errc::peer_disconnected);
  CHECK(gone->n == sl::notice{3, sl::notice_kind::abort, 0});
}

TEST_CASE("shm_transport: notices arrive in order, each after its batch's bytes") {
  const auto path = socket_path("order");
  constexpr std::uint32_t count = 24;
  const std::size_t part = 256 << 10;
  std::vector<region_spec> layout;
  for (std::uint32_t k = 1; k <= count; ++k) layout.push_back({"p" + std::to_string(k), (k - 1) * part, part});
  const pid_t child = spawn([&] {
    std::uint32_t expected = 1;
    return serve(path, count * part, layout, [&](std::error_code ec, sl::notice n, std::span<std::byte> arena) {
      if (ec) return 30;
      if (n.version != expected || n.kind != sl::notice_kind::commit) return 31;
      // batch k wrote part k; the sender may already be copying k+1
      for (std::uint32_t k = 1; k <= n.version; ++k)
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
    for (std::uint32_t k = 1; k <= count; ++k) {
      conn->async_write(batches[k - 1], log.handler());
      conn->async_notify(sl::notice_kind::commit, k, log.handler());
    }
    REQUIRE(run_until(io, [&] { return log.codes.size() == 2 * count; }));
    for (auto ec : log.codes) CHECK(ec == std::error_code{});
    CHECK(wait_child(child) == 0);
  }
}

TEST_CASE("shm_transport: a write outside the exposed regions fails the whole batch, nothing written") {
  const auto path = socket_path("outside");
  const std::size_t arena = 2 << 20, exposed = 1 << 20;
  const pid_t child = spawn([&] {
    return serve(path, arena, {{"model.layers.0.qkv_proj.weight", 0, exposed}},
                 [&](std::error_code ec, sl::notice n, std::span<std::byte> a) {
                   if (ec || n.version != 1) return 40;
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
      CHECK(ec.message() == "write outside every exposed region");
    }
    CHECK(conn->is_open());  // a refused batch leaves the link usable
    std::optional<std::error_code> done;
    conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { done = ec; });
    REQUIRE(run_until(io, [&] { return done.has_value(); }));
    CHECK(*done == std::error_code{});
    CHECK(wait_child(child) == 0);
  }
}

TEST_CASE("shm_transport: the region table carries location, layout and arena to the sender") {
  const auto path = socket_path("layout");
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto first = r.allocate(4096);
  auto second = r.allocate(8192);
  const sl::tensor_layout qkv{sl::dtype::bf16, {4, 8}};
  r.expose({"qkv", first.subspan(0, 64), sl::memory_location::host(), qkv});
  r.expose("raw", first.subspan(64, 100));
  r.expose({"norm", second.subspan(4096, 256), sl::memory_location::host(), sl::tensor_layout{sl::dtype::f32, {64}}});
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> accepted;
  r.async_accept(accepted.handler());
  auto [ec, conn] = connect_once(io, t, path);
  REQUIRE(ec == std::error_code{});
  REQUIRE(run_until(io, [&] { return accepted.ready(); }));
  CHECK(accepted.code() == std::error_code{});
  const auto& table = conn->remote_regions();
  REQUIRE(table.size() == 3);
  const auto* q = table.find("qkv");
  const auto* raw = table.find("raw");
  const auto* norm = table.find("norm");
  REQUIRE(q);
  REQUIRE(raw);
  REQUIRE(norm);
  CHECK(q->layout == qkv);
  CHECK(q->location == sl::memory_location::host());
  CHECK(q->address == reinterpret_cast<std::uintptr_t>(first.data()));
  CHECK(q->key == 0);
  CHECK_FALSE(raw->layout.has_value());
  CHECK(raw->length == 100);
  CHECK(norm->layout == sl::tensor_layout{sl::dtype::f32, {64}});
  CHECK(norm->key == 1);  // the second arena: writes to it go through its own mapping
  CHECK(table.regions() == r.regions().regions());
  auto src = patterned(256, 8);
  std::vector<sl::write_request> batch{sl::make_write(sl::local_region{src.data(), src.size()}, src, *norm)};
  std::optional<std::error_code> wrote;
  conn->async_write(batch, [&](std::error_code e) { wrote = e; });
  REQUIRE(run_until(io, [&] { return wrote.has_value(); }));
  CHECK(*wrote == std::error_code{});
  CHECK(holds_pattern(second.subspan(4096, 256), 8));
  CHECK(all_zero(second.subspan(0, 4096)));
  CHECK(all_zero(first));
}

// ---- notices and their acknowledgement ----------------------------------------------------

TEST_CASE("shm_transport: a notice completes only once the receiver queued it; a full queue holds back the ack") {
  const auto path = socket_path("ackq");
  asio::io_context io;
  sl::shm_options o;
  o.notice_depth = 1;
  sl::shm_transport::receiver r(io.get_executor(), path, o);
  auto arena = r.allocate(4096);
  r.expose("w", arena);
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> accepted;
  r.async_accept(accepted.handler());
  auto [ec, conn] = connect_once(io, t, path, {2, 0});
  REQUIRE(ec == std::error_code{});
  std::optional<std::error_code> begun, committed;
  conn->async_notify(sl::notice_kind::begin, 1, [&](std::error_code e) { begun = e; });
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { committed = e; });
  REQUIRE(run_until(io, [&] { return begun.has_value(); }));
  CHECK(*begun == std::error_code{});  // queued at the receiver: acknowledged
  run_for(io, 300ms);
  CHECK_FALSE(committed.has_value());  // the queue is full: no ack yet
  auto first = next_notice(io, r);
  REQUIRE(first);
  CHECK(first->ec == std::error_code{});
  CHECK(first->n == sl::notice{2, sl::notice_kind::begin, 1});
  REQUIRE(run_until(io, [&] { return committed.has_value(); }));  // room again: queued, acked
  CHECK(*committed == std::error_code{});
  auto second = next_notice(io, r);
  REQUIRE(second);
  CHECK(second->n == sl::notice{2, sl::notice_kind::commit, 1});
}

TEST_CASE("shm_transport: a receiver SIGKILLed before acknowledging a notice fails it with peer_disconnected") {
  const auto path = socket_path("noack");
  const std::size_t bytes = 1 << 20;
  const pid_t child = spawn([&] {
    // Takes the sender and its writes, but never waits for a notice: with no queue room a
    // notice is never acknowledged.
    asio::io_context io;
    sl::shm_options o;
    o.notice_depth = 0;
    sl::shm_transport::receiver r(io.get_executor(), path, o);
    r.expose("w", r.allocate(bytes));
    outcome<std::error_code, std::uint32_t> accepted;
    r.async_accept(accepted.handler());
    run_until(io, [] { return false; }, 60s);
    return 0;
  });
  asio::io_context io;
  sl::shm_transport t(io.get_executor());
  auto conn = connect(io, t, path, {1, 0});
  REQUIRE(conn);
  auto src = patterned(bytes, 6);
  std::vector<sl::write_request> batch{{src, 0, conn->remote_regions().find("w")->address, 0}};
  std::optional<std::error_code> wrote, notified;
  conn->async_write(batch, [&](std::error_code e) { wrote = e; });
  REQUIRE(run_until(io, [&] { return wrote.has_value(); }));
  CHECK(*wrote == std::error_code{});  // the last write landed
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { notified = e; });
  run_for(io, 300ms);
  CHECK_FALSE(notified.has_value());  // sent, not acknowledged: still pending
  ::kill(child, SIGKILL);
  REQUIRE(run_until(io, [&] { return notified.has_value(); }));
  CHECK(*notified == sl::errc::peer_disconnected);
  CHECK(notified->message() == "peer disconnected");
  CHECK(wait_child(child) == 128 + SIGKILL);
  ::unlink(path.c_str());  // a killed receiver cannot remove its socket file
  CHECK_FALSE(conn->is_open());
  std::optional<std::error_code> later;
  conn->async_notify(sl::notice_kind::abort, 1, [&](std::error_code e) { later = e; });
  REQUIRE(run_until(io, [&] { return later.has_value(); }));
  CHECK(*later == sl::errc::peer_disconnected);
}

TEST_CASE("shm_transport: a cancelled notice completes with operation_aborted and later notices are still acked right") {
  const auto path = socket_path("cancelnotice");
  asio::io_context io;
  sl::shm_options o;
  o.notice_depth = 0;  // nothing is acknowledged before a wait takes it
  sl::shm_transport::receiver r(io.get_executor(), path, o);
  auto arena = r.allocate(4096);
  r.expose("w", arena);
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> accepted;
  r.async_accept(accepted.handler());
  auto [ec, conn] = connect_once(io, t, path);
  REQUIRE(ec == std::error_code{});
  asio::cancellation_signal signal;
  std::optional<std::error_code> first, wrote, second;
  conn->async_notify(sl::notice_kind::begin, 1,
                     asio::bind_cancellation_slot(signal.slot(), [&](std::error_code e) { first = e; }));
  run_for(io, 200ms);  // sent; waits for its ack
  CHECK_FALSE(first.has_value());
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(run_until(io, [&] { return first.has_value(); }));
  CHECK(*first == asio::error::operation_aborted);
  CHECK(conn->is_open());
  auto src = patterned(4096, 2);
  std::vector<sl::write_request> batch{{src, 0, conn->remote_regions().find("w")->address, 0}};
  conn->async_write(batch, [&](std::error_code e) { wrote = e; });
  REQUIRE(run_until(io, [&] { return wrote.has_value(); }));
  CHECK(*wrote == std::error_code{});
  CHECK(holds_pattern(arena, 2));
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { second = e; });
  // The cancelled notice had gone out: the receiver still gets it, and its ack is dropped.
  auto a = next_notice(io, r);
  REQUIRE(a);
  CHECK(a->n == sl::notice{0, sl::notice_kind::begin, 1});
  CHECK_FALSE(second.has_value());
  auto b = next_notice(io, r);
  REQUIRE(b);
  CHECK(b->n == sl::notice{0, sl::notice_kind::commit, 1});
  REQUIRE(run_until(io, [&] { return second.has_value(); }));
  CHECK(*second == std::error_code{});
  CHECK(conn->is_open());
}

TEST_CASE("shm_transport: an ack that is not the notice's fails it with protocol_error and ends the link") {
  const auto path = socket_path("badack");
  asio::io_context io;
  sl::shm_transport t(io.get_executor());
  sl::region_table table({{"w", 0x10000, 4096, 0, {}, {}}});
  fake_receiver fake(path, 0x10000, 4096, table, sl::detail::encode_notice(sl::notice_kind::commit, 8));
  auto [ec, conn] = connect_once(io, t, path, {0, 0});
  REQUIRE(ec == std::error_code{});
  std::optional<std::error_code> notified, later;
  conn->async_notify(sl::notice_kind::commit, 7, [&](std::error_code e) { notified = e; });
  REQUIRE(run_until(io, [&] { return notified.has_value(); }));
  CHECK(*notified == sl::errc::protocol_error);
  CHECK_FALSE(conn->is_open());
  std::vector<sl::write_request> none;
  conn->async_write(none, [&](std::error_code e) { later = e; });
  REQUIRE(run_until(io, [&] { return later.has_value(); }));
  CHECK(*later == sl::errc::protocol_error);
}

// ---- many senders -------------------------------------------------------------------------

TEST_CASE("shm_transport: three sender processes, one receiver: every sender's writes land, its notices name it") {
  const auto path = socket_path("three");
  const std::size_t part = (1 << 20) + 13;
  constexpr std::uint64_t fingerprint = 0x5eed;
  std::vector<pid_t> children;
  for (std::uint32_t k = 0; k < 3; ++k)
    children.push_back(spawn([&, k] {
      asio::io_context io;
      sl::shm_transport t(io.get_executor());
      auto conn = connect(io, t, path, {k, fingerprint});
      if (!conn) return 20;
      if (conn->identity().sender != k) return 21;
      const auto* r = conn->remote_regions().find("p" + std::to_string(k));
      if (!r) return 22;
      auto src = patterned(part, 10 + k);
      std::vector<sl::write_request> batch{{src, 0, r->address, 0}};
      completion_log log;
      conn->async_notify(sl::notice_kind::begin, 5, log.handler());
      conn->async_write(batch, log.handler());
      conn->async_notify(sl::notice_kind::commit, 5, log.handler());
      if (!run_until(io, [&] { return log.codes.size() == 3; })) return 23;
      for (auto ec : log.codes)
        if (ec) return 24;
      return 0;
    }));
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto arena = r.allocate(3 * part);
  for (std::uint32_t k = 0; k < 3; ++k) r.expose("p" + std::to_string(k), arena.subspan(k * part, part));
  r.admit({3, fingerprint});

  std::vector<std::pair<std::error_code, std::uint32_t>> accepts;
  std::function<void()> accept_next = [&] {
    r.async_accept([&](std::error_code ec, std::uint32_t who) {
      accepts.emplace_back(ec, who);
      if (accepts.size() < 3) accept_next();
    });
  };
  accept_next();
  std::map<std::uint32_t, std::vector<event>> events;
  std::map<std::uint32_t, bool> landed_at_commit;
  std::size_t departures = 0;
  std::function<void()> wait_next = [&] {
    r.async_wait_notification([&](std::error_code ec, sl::notice n) {
      events[n.sender].push_back({ec, n});
      if (!ec && n.kind == sl::notice_kind::commit && n.sender < 3)
        landed_at_commit[n.sender] = holds_pattern(arena.subspan(n.sender * part, part), 10 + n.sender);
      if (ec) ++departures;
      if (departures < 3) wait_next();
    });
  };
  wait_next();
  REQUIRE(run_until(io, [&] { return departures == 3 && accepts.size() == 3; }, 60s));
  std::set<std::uint32_t> ids;
  for (auto [ec, who] : accepts) {
    CHECK(ec == std::error_code{});
    ids.insert(who);
  }
  CHECK(ids == std::set<std::uint32_t>{0, 1, 2});
  REQUIRE(events.size() == 3);
  for (std::uint32_t k = 0; k < 3; ++k) {
    const auto& e = events[k];
    REQUIRE(e.size() == 3);
    CHECK(e[0].ec == std::error_code{});
    CHECK(e[0].n == sl::notice{k, sl::notice_kind::begin, 5});
    CHECK(e[1].ec == std::error_code{});
    CHECK(e[1].n == sl::notice{k, sl::notice_kind::commit, 5});
    CHECK(e[2].ec == sl::errc::peer_disconnected);
    CHECK(e[2].n == sl::notice{k, sl::notice_kind::abort, 0});
    CHECK(landed_at_commit[k]);
  }
  for (auto c : children) CHECK(wait_child(c) == 0);
}

TEST_CASE("shm_transport: a trainer killed and restarted with the same id is accepted again") {
  const auto path = socket_path("restart");
  const std::size_t bytes = 1 << 20;
  auto trainer = [&](unsigned seed, std::uint32_t version, bool linger) {
    return spawn([&, seed, version, linger] {
      asio::io_context io;
      sl::shm_transport t(io.get_executor());
      auto conn = connect(io, t, path, {1, 0});
      if (!conn) return 20;
      auto src = patterned(bytes, seed);
      std::vector<sl::write_request> batch{{src, 0, conn->remote_regions().find("w")->address, 0}};
      completion_log log;
      conn->async_write(batch, log.handler());
      conn->async_notify(sl::notice_kind::commit, version, log.handler());
      if (!run_until(io, [&] { return log.codes.size() == 2; })) return 21;
      if (log.codes[0] || log.codes[1]) return 22;
      if (linger) run_until(io, [] { return false; }, 60s);  // until killed
      return 0;
    });
  };
  const pid_t first = trainer(1, 1, true);
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto arena = r.allocate(bytes);
  r.expose("w", arena);
  r.admit({2, 0});
  std::vector<std::pair<std::error_code, std::uint32_t>> accepts;
  std::function<void()> accept_next = [&] {
    r.async_accept([&](std::error_code ec, std::uint32_t who) {
      accepts.emplace_back(ec, who);
      if (accepts.size() < 2) accept_next();
    });
  };
  accept_next();
  auto e1 = next_notice(io, r);
  REQUIRE(e1);
  CHECK(e1->ec == std::error_code{});
  CHECK(e1->n == sl::notice{1, sl::notice_kind::commit, 1});
  CHECK(holds_pattern(arena, 1));
  ::kill(first, SIGKILL);
  CHECK(wait_child(first) == 128 + SIGKILL);
  const pid_t second = trainer(2, 2, false);  // at once: the receiver may not have read the end yet
  auto e2 = next_notice(io, r);
  REQUIRE(e2);
  CHECK(e2->ec == sl::errc::peer_disconnected);
  CHECK(e2->n == sl::notice{1, sl::notice_kind::abort, 0});
  auto e3 = next_notice(io, r);
  REQUIRE(e3);
  CHECK(e3->ec == std::error_code{});
  CHECK(e3->n == sl::notice{1, sl::notice_kind::commit, 2});
  CHECK(holds_pattern(arena, 2));
  REQUIRE(accepts.size() == 2);
  CHECK(accepts[0] == std::pair{std::error_code{}, 1u});
  CHECK(accepts[1] == std::pair{std::error_code{}, 1u});
  CHECK(wait_child(second) == 0);
  auto e4 = next_notice(io, r);
  REQUIRE(e4);
  CHECK(e4->ec == sl::errc::peer_disconnected);
  CHECK(e4->n == sl::notice{1, sl::notice_kind::abort, 0});
}

TEST_CASE("shm_transport: a successor is admitted even while the receiver has not yet read its predecessor's end") {
  const auto path = socket_path("successor");
  asio::io_context io;
  sl::shm_options o;
  o.notice_depth = 0;  // the predecessor's notice blocks its reader: its end stays unread
  sl::shm_transport::receiver r(io.get_executor(), path, o);
  r.expose("w", r.allocate(4096));
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> a1;
  r.async_accept(a1.handler());
  auto [ec1, first] = connect_once(io, t, path, {0, 0});
  REQUIRE(ec1 == std::error_code{});
  std::optional<std::error_code> unacked;
  first->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { unacked = e; });
  run_for(io, 200ms);  // read by the receiver, waiting for room in the queue
  CHECK_FALSE(unacked.has_value());
  first->close();
  outcome<std::error_code, std::uint32_t> a2;
  r.async_accept(a2.handler());
  auto [ec2, second] = connect_once(io, t, path, {0, 0});
  CHECK(ec2 == std::error_code{});
  REQUIRE(run_until(io, [&] { return a2.ready() && unacked.has_value(); }));
  CHECK(a2.get() == std::tuple{std::error_code{}, 0u});
  CHECK(*unacked == asio::error::operation_aborted);
  // In order: the predecessor's notice, its departure, then the successor's notices.
  auto e1 = next_notice(io, r);
  REQUIRE(e1);
  CHECK(e1->ec == std::error_code{});
  CHECK(e1->n == sl::notice{0, sl::notice_kind::commit, 1});
  auto e2 = next_notice(io, r);
  REQUIRE(e2);
  CHECK(e2->ec == sl::errc::peer_disconnected);
  CHECK(e2->n == sl::notice{0, sl::notice_kind::abort, 0});
  REQUIRE(second);
  std::optional<std::error_code> acked;
  second->async_notify(sl::notice_kind::commit, 2, [&](std::error_code e) { acked = e; });
  auto e3 = next_notice(io, r);
  REQUIRE(e3);
  CHECK(e3->n == sl::notice{0, sl::notice_kind::commit, 2});
  REQUIRE(run_until(io, [&] { return acked.has_value(); }));
  CHECK(*acked == std::error_code{});
}

TEST_CASE("shm_transport: admission refuses another plan and an unknown sender id, then admits the right sender") {
  const auto path = socket_path("admit");
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto arena = r.allocate(4096);
  r.expose("w", arena);
  r.admit({2, 0xabc});
  sl::shm_transport t(io.get_executor());
  auto attempt = [&](sl::sender_identity who) {
    outcome<std::error_code, std::uint32_t> accepted;
    r.async_accept(accepted.handler());
    auto [ec, conn] = connect_once(io, t, path, who);
    REQUIRE(run_until(io, [&] { return accepted.ready(); }));
    return std::tuple{ec, std::move(conn), accepted.get()};
  };
  SUBCASE("another plan, no plan") {
    for (std::uint64_t fp : {0xdefull, 0ull}) {
      auto [ec, conn, accepted] = attempt({0, fp});
      CHECK(ec == sl::errc::plan_mismatch);
      CHECK(ec.message() == "peers built from different plans");
      CHECK_FALSE(conn.has_value());
      CHECK(std::get<0>(accepted) == sl::errc::plan_mismatch);
      CHECK(std::get<1>(accepted) == 0);
    }
  }
  SUBCASE("a sender id past the admitted count") {
    auto [ec, conn, accepted] = attempt({7, 0xabc});
    CHECK(ec == sl::errc::unknown_sender);
    CHECK(ec.message() == "unknown sender");
    CHECK(std::get<0>(accepted) == sl::errc::unknown_sender);
    CHECK(std::get<1>(accepted) == 7);
  }
  // Either way the receiver goes on listening and admits the legitimate sender.
  auto [ec, conn, accepted] = attempt({1, 0xabc});
  REQUIRE(ec == std::error_code{});
  CHECK(std::get<0>(accepted) == std::error_code{});
  CHECK(std::get<1>(accepted) == 1);
  CHECK(conn->identity().sender == 1);
  CHECK(conn->identity().plan_fingerprint == 0xabc);
  auto src = patterned(4096, 3);
  std::vector<sl::write_request> batch{{src, 0, conn->remote_regions().find("w")->address, 0}};
  completion_log log;
  conn->async_write(batch, log.handler());
  conn->async_notify(sl::notice_kind::commit, 9, log.handler());
  auto got = next_notice(io, r);
  REQUIRE(got);
  CHECK(got->n == sl::notice{1, sl::notice_kind::commit, 9});
  CHECK(holds_pattern(arena, 3));
  REQUIRE(run_until(io, [&] { return log.codes.size() == 2; }));
  CHECK(log.codes == std::vector<std::error_code>{{}, {}});
}

TEST_CASE("shm_transport: a second live connection with a taken id is refused; once the first leaves, the id is free") {
  const auto path = socket_path("taken");
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  r.expose("w", r.allocate(4096));
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> a1;
  r.async_accept(a1.handler());
  auto [ec1, first] = connect_once(io, t, path, {0, 0});
  REQUIRE(ec1 == std::error_code{});
  REQUIRE(run_until(io, [&] { return a1.ready(); }));
  CHECK(a1.get() == std::tuple{std::error_code{}, 0u});

  outcome<std::error_code, std::uint32_t> a2;
  r.async_accept(a2.handler());
  auto [ec2, second] = connect_once(io, t, path, {0, 0});
  CHECK(ec2 == sl::errc::invalid_argument);  // sender 0 is already connected
  CHECK_FALSE(second.has_value());
  REQUIRE(run_until(io, [&] { return a2.ready(); }));
  CHECK(a2.get() == std::tuple{std::error_code(sl::errc::invalid_argument), 0u});

  // The first sender is untouched.
  CHECK(first->is_open());
  std::optional<std::error_code> notified;
  first->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { notified = e; });
  auto got = next_notice(io, r);
  REQUIRE(got);
  CHECK(got->n == sl::notice{0, sl::notice_kind::commit, 1});
  REQUIRE(run_until(io, [&] { return notified.has_value(); }));
  CHECK(*notified == std::error_code{});

  first->close();
  auto gone = next_notice(io, r);
  REQUIRE(gone);
  CHECK(gone->ec == sl::errc::peer_disconnected);
  CHECK(gone->n == sl::notice{0, sl::notice_kind::abort, 0});
  outcome<std::error_code, std::uint32_t> a3;
  r.async_accept(a3.handler());
  auto [ec3, third] = connect_once(io, t, path, {0, 0});
  CHECK(ec3 == std::error_code{});
  REQUIRE(run_until(io, [&] { return a3.ready(); }));
  CHECK(a3.get() == std::tuple{std::error_code{}, 0u});
}

TEST_CASE("shm_transport: a hello of another protocol version or magic, or none, is refused and the receiver keeps listening") {
  const auto path = socket_path("hello");
  asio::io_context io;
  sl::shm_options o;
  o.connect_timeout = 300ms;
  sl::shm_transport::receiver r(io.get_executor(), path, o);
  r.expose("w", r.allocate(4096));
  auto refuse = [&](std::optional<sl::detail::hello_frame> hello) {
    outcome<std::error_code, std::uint32_t> accepted;
    r.async_accept(accepted.handler());
    const int fd = raw_client(path);
    REQUIRE(fd >= 0);
    if (hello) REQUIRE(raw_send(fd, *hello));
    REQUIRE(run_until(io, [&] { return accepted.ready(); }));
    auto reply = raw_read_to_end(fd);  // the verdict, then end of file
    ::close(fd);
    REQUIRE(reply);
    return std::pair{accepted.code(), *reply};
  };
  SUBCASE("another protocol version") {
    auto [ec, reply] = refuse(hello_with("SLSH", sl::detail::control_protocol + 1, 0));
    CHECK(ec == sl::errc::protocol_version_mismatch);
    CHECK(reply.size() == sl::detail::verdict_bytes);
    CHECK(verdict_in(reply) == sl::errc::protocol_version_mismatch);
  }
  SUBCASE("another magic") {
    auto [ec, reply] = refuse(hello_with("SLVB", sl::detail::control_protocol, 0));
    CHECK(ec == sl::errc::protocol_error);
    CHECK(verdict_in(reply) == sl::errc::protocol_error);
  }
  SUBCASE("no hello at all: the handshake times out") {
    auto [ec, reply] = refuse(std::nullopt);
    CHECK(ec == std::errc::timed_out);
    CHECK(reply.empty());
  }
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> accepted;
  r.async_accept(accepted.handler());
  auto [ec, conn] = connect_once(io, t, path, {4, 0});
  CHECK(ec == std::error_code{});
  REQUIRE(run_until(io, [&] { return accepted.ready(); }));
  CHECK(accepted.get() == std::tuple{std::error_code{}, 4u});
}

TEST_CASE("shm_transport: a malformed notice drops its sender with protocol_error naming it; the id is free again") {
  const auto path = socket_path("garbage");
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  r.expose("w", r.allocate(4096));
  outcome<std::error_code, std::uint32_t> accepted;
  r.async_accept(accepted.handler());
  const int fd = raw_client(path);
  REQUIRE(fd >= 0);
  REQUIRE(raw_send(fd, sl::detail::encode_hello("SLSH", {4, 0})));
  REQUIRE(run_until(io, [&] { return accepted.ready(); }));
  CHECK(accepted.get() == std::tuple{std::error_code{}, 4u});
  sl::detail::notice_frame garbage = sl::detail::encode_notice(sl::notice_kind::commit, 3);
  garbage[0] = std::byte{9};  // no such kind
  REQUIRE(raw_send(fd, garbage));
  auto got = next_notice(io, r);
  REQUIRE(got);
  CHECK(got->ec == sl::errc::protocol_error);
  CHECK(got->n == sl::notice{4, sl::notice_kind::abort, 0});
  auto rest = raw_read_to_end(fd);  // verdict, header, table, then the receiver hung up
  ::close(fd);
  REQUIRE(rest);
  CHECK(verdict_in(*rest) == std::error_code{});
  CHECK(rest->size() > sl::detail::verdict_bytes + sl::detail::shm_header_bytes);
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> again;
  r.async_accept(again.handler());
  auto [ec, conn] = connect_once(io, t, path, {4, 0});
  CHECK(ec == std::error_code{});
  REQUIRE(run_until(io, [&] { return again.ready(); }));
  CHECK(again.get() == std::tuple{std::error_code{}, 4u});
}

TEST_CASE("shm_transport: a region table naming memory outside its arena fails the connect with protocol_error") {
  const auto path = socket_path("badtable");
  asio::io_context io;
  sl::shm_transport t(io.get_executor());
  SUBCASE("past the arena's end") {
    fake_receiver fake(path, 0x10000, 4096, sl::region_table({{"w", 0x10000 + 4000, 200, 0, {}, {}}}), {});
    CHECK(connect_once(io, t, path).first == sl::errc::protocol_error);
  }
  SUBCASE("an arena index that was not sent") {
    fake_receiver fake(path, 0x10000, 4096, sl::region_table({{"w", 0x10000, 100, 1, {}, {}}}), {});
    CHECK(connect_once(io, t, path).first == sl::errc::protocol_error);
  }
}

// ---- failures and cancellation -------------------------------------------------------------

TEST_CASE("shm_transport: receiver SIGKILLed mid-update fails every pending write and notice with peer_disconnected") {
  const auto path = socket_path("kill");
  const std::size_t bytes = 32 << 20;
  const pid_t child = spawn([&] {
    return serve(path, bytes, {{"w", 0, bytes}},
                 [](std::error_code, sl::notice, std::span<std::byte>) { return -1; });
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
  for (std::size_t i = 0; i < n; ++i) {
    conn->async_write(batch, [&](std::error_code ec) {
      codes.push_back(ec);
      if (!killed) {  // the first write landed: the rest are queued or copying
        killed = true;
        ::kill(child, SIGKILL);
      }
    });
  }
  std::optional<std::error_code> notified;
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { notified = ec; });
  REQUIRE(run_until(io, [&] { return codes.size() == n && notified.has_value(); }));
  CHECK(wait_child(child) == 128 + SIGKILL);
  ::unlink(path.c_str());  // a killed receiver cannot remove its socket file
  std::size_t ok = 0, gone = 0;
  for (auto ec : codes) {
    if (!ec) ++ok;
    else if (ec == sl::errc::peer_disconnected) ++gone;
    else FAIL("unexpected completion: " << ec.message());
  }
  CHECK(ok >= 1);
  CHECK(gone >= 1);
  CHECK(ok + gone == n);
  // How many writes land before the end of file is read depends on timing (sanitizer builds
  // copy slower); what does not: once one write failed, every later one fails too.
  const auto first_gone = std::find_if(codes.begin(), codes.end(), [](std::error_code ec) { return bool(ec); });
  CHECK(std::all_of(first_gone, codes.end(), [](std::error_code ec) { return bool(ec); }));
  CHECK(codes.back() == sl::errc::peer_disconnected);
  CHECK(*notified == sl::errc::peer_disconnected);
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
    t.async_connect(path, [&](std::error_code ec, connection c) {
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
  SUBCASE("a receiver that went away before its verdict: peer_disconnected") {
    std::optional<sl::shm_transport::receiver> gone(std::in_place, io.get_executor(), socket_path("gone"));
    std::optional<std::error_code> result;
    t.async_connect(socket_path("gone"), [&](std::error_code ec, connection) { result = ec; });
    run_for(io, 50ms);  // in the backlog, hello sent
    gone.reset();
    REQUIRE(run_until(io, [&] { return result.has_value(); }));
    CHECK(*result == sl::errc::peer_disconnected);
  }
  SUBCASE("a connect cancelled through its slot completes with operation_aborted") {
    sl::shm_transport::receiver mute(io.get_executor(), socket_path("mute2"));
    asio::cancellation_signal signal;
    std::optional<std::error_code> result;
    t.async_connect(socket_path("mute2"),
                    asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec, connection) { result = ec; }));
    io.restart();
    io.poll();  // connected to the backlog, waiting for the verdict
    CHECK_FALSE(result.has_value());
    signal.emit(asio::cancellation_type::terminal);
    REQUIRE(run_until(io, [&] { return result.has_value(); }));
    CHECK(*result == asio::error::operation_aborted);
  }
}

TEST_CASE("shm_transport: async_accept is cancellable, one at a time, ended by close(), not_connected after it") {
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), socket_path("accept"));
  asio::cancellation_signal signal;
  outcome<std::error_code, std::uint32_t> cancelled;
  r.async_accept(asio::bind_cancellation_slot(signal.slot(), cancelled.handler()));
  io.poll();
  CHECK_FALSE(cancelled.ready());
  outcome<std::error_code, std::uint32_t> concurrent;
  r.async_accept(concurrent.handler());
  REQUIRE(run_until(io, [&] { return concurrent.ready(); }));
  CHECK(concurrent.code() == sl::errc::invalid_argument);
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(run_until(io, [&] { return cancelled.ready(); }));
  CHECK(cancelled.code() == asio::error::operation_aborted);

  outcome<std::error_code, std::uint32_t> pending;
  r.async_accept(pending.handler());
  outcome<std::error_code, sl::notice> waiting;
  r.async_wait_notification(waiting.handler());
  io.poll();
  CHECK_FALSE(pending.ready());
  CHECK_FALSE(waiting.ready());
  r.close();
  REQUIRE(run_until(io, [&] { return pending.ready() && waiting.ready(); }));
  CHECK(pending.code() == asio::error::operation_aborted);
  CHECK(waiting.code() == asio::experimental::error::channel_cancelled);

  outcome<std::error_code, std::uint32_t> later;
  r.async_accept(later.handler());
  CHECK_FALSE(later.ready());  // never inline
  REQUIRE(run_until(io, [&] { return later.ready(); }));
  CHECK(later.code() == sl::errc::not_connected);
  outcome<std::error_code, sl::notice> waited;
  r.async_wait_notification(waited.handler());
  REQUIRE(run_until(io, [&] { return waited.ready(); }));
  CHECK(waited.code() == sl::errc::not_connected);
  CHECK(::access(socket_path("accept").c_str(), F_OK) != 0);  // the socket file is gone
}

TEST_CASE("shm_transport: a receiver closed under a sender fails its pending notice with peer_disconnected") {
  const auto path = socket_path("rclose");
  asio::io_context io;
  sl::shm_options o;
  o.notice_depth = 0;
  sl::shm_transport::receiver r(io.get_executor(), path, o);
  r.expose("w", r.allocate(4096));
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, std::uint32_t> accepted;
  r.async_accept(accepted.handler());
  auto [ec, conn] = connect_once(io, t, path);
  REQUIRE(ec == std::error_code{});
  std::optional<std::error_code> notified;
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { notified = e; });
  run_for(io, 200ms);
  CHECK_FALSE(notified.has_value());
  r.close();
  REQUIRE(run_until(io, [&] { return notified.has_value(); }));
  CHECK(*notified == sl::errc::peer_disconnected);
  CHECK_FALSE(conn->is_open());
}

TEST_CASE("shm_transport: receiver errors name the region or socket path and the cause") {
  asio::io_context io;
  SUBCASE("expose outside every arena") {
    sl::shm_transport::receiver r(io.get_executor(), socket_path("expose"));
    auto arena = r.allocate(4096);
    std::vector<std::byte> elsewhere(64);
    auto e = thrown_by([&] { r.expose("model.norm.weight", elsewhere); });
    REQUIRE(e);
    CHECK(e->first == sl::errc::unsupported_memory);
    CHECK(e->second ==
          "shm receiver: region 'model.norm.weight' is not inside an arena this receiver allocated: the shm "
          "transport can share only its own memfd arenas (allocate() them, or use weights_receiver's layout "
          "mode): memory kind not supported");
    // straddling the arena's end is outside too
    auto tail = thrown_by([&] { r.expose("tail", std::span(arena.data() + 4000, 200)); });
    REQUIRE(tail);
    CHECK(tail->first == sl::errc::unsupported_memory);
    CHECK(tail->second.find("region 'tail' is not inside an arena") != std::string::npos);
    r.expose("ok", arena.subspan(0, 100));
    CHECK(r.regions().size() == 1);
  }
  SUBCASE("memory of a kind the shm transport cannot share") {
    sl::shm_transport::receiver r(io.get_executor(), socket_path("kind"));
    auto arena = r.allocate(4096);
    auto gpu = thrown_by([&] { r.expose({"gpu", arena.subspan(0, 64), sl::memory_location::cuda(0), {}}); });
    REQUIRE(gpu);
    CHECK(gpu->first == sl::errc::unsupported_memory);
    CHECK(gpu->second ==
          "shm receiver: region 'gpu' is cuda_device:0 memory, which the shm transport cannot move (it moves "
          "{host}): memory kind not supported");
    auto pinned = thrown_by([&] { r.expose({"pinned", arena.subspan(0, 64), sl::memory_location::host_pinned(), {}}); });
    REQUIRE(pinned);
    CHECK(pinned->first == sl::errc::unsupported_memory);
    CHECK(pinned->second.find("region 'pinned' is host_pinned memory") != std::string::npos);
    CHECK(r.regions().empty());
  }
  SUBCASE("a name given twice, an overlap") {
    sl::shm_transport::receiver r(io.get_executor(), socket_path("twice"));
    auto arena = r.allocate(4096);
    r.expose("a", arena.subspan(0, 100));
    auto twice = thrown_by([&] { r.expose("a", arena.subspan(200, 100)); });
    REQUIRE(twice);
    CHECK(twice->first == sl::errc::invalid_argument);
    CHECK(twice->second == "shm receiver: region 'a' is exposed twice: invalid argument");
    auto overlap = thrown_by([&] { r.expose("b", arena.subspan(50, 100)); });
    REQUIRE(overlap);
    CHECK(overlap->first == sl::errc::invalid_argument);
    CHECK(overlap->second ==
          "shm receiver: region 'b' (100 bytes) overlaps region 'a' (100 bytes): invalid argument");
    CHECK(r.regions().size() == 1);
  }
  SUBCASE("expose or allocate after a sender connected") {
    const auto path = socket_path("late");
    sl::shm_transport::receiver r(io.get_executor(), path);
    auto arena = r.allocate(4096);
    r.expose("a", arena.subspan(0, 100));
    sl::shm_transport t(io.get_executor());
    outcome<std::error_code, std::uint32_t> accepted;
    r.async_accept(accepted.handler());
    auto [ec, conn] = connect_once(io, t, path);
    REQUIRE(ec == std::error_code{});
    REQUIRE(run_until(io, [&] { return accepted.ready(); }));
    auto late = thrown_by([&] { r.expose("b", arena.subspan(200, 100)); });
    REQUIRE(late);
    CHECK(late->first == sl::errc::invalid_argument);
    CHECK(late->second == "shm receiver: region 'b' exposed after a sender connected: invalid argument");
    auto more = thrown_by([&] { (void)r.allocate(4096); });
    REQUIRE(more);
    CHECK(more->first == sl::errc::invalid_argument);
    CHECK(more->second == "shm receiver '" + path +
                              "': arena of 4096 bytes: allocated after a sender connected: invalid argument");
  }
  SUBCASE("a socket path in a missing directory") {
    const std::string path = "/tmp/shardline-no-such-dir-" + std::to_string(getpid()) + "/x.sock";
    auto e = thrown_by([&] { sl::shm_transport::receiver r(io.get_executor(), path); });
    REQUIRE(e);
    CHECK(e->first == std::errc::no_such_file_or_directory);
    CHECK(e->second.find("shm receiver: cannot bind socket '" + path + "': ") != std::string::npos);
  }
  SUBCASE("a socket path too long") {
    const std::string path = "/tmp/" + std::string(120, 'y');
    auto e = thrown_by([&] { sl::shm_transport::receiver r(io.get_executor(), path); });
    REQUIRE(e);
    CHECK(e->first == sl::errc::invalid_argument);
    CHECK(e->second == "shm receiver: socket path '" + path + "' must be 1 to 107 bytes: invalid argument");
  }
  SUBCASE("an empty arena") {
    const auto path = socket_path("empty");
    sl::shm_transport::receiver r(io.get_executor(), path);
    auto e = thrown_by([&] { (void)r.allocate(0); });
    REQUIRE(e);
    CHECK(e->first == sl::errc::invalid_argument);
    CHECK(e->second == "shm receiver '" + path + "': arena of 0 bytes: an arena cannot be empty: invalid argument");
  }
}

TEST_CASE("shm_transport: memory kinds: host and pinned staging, host destinations; device staging refused") {
  static_assert(sl::shm_transport::source_kinds ==
                sl::memory_kinds{sl::memory_kind::host, sl::memory_kind::host_pinned});
  static_assert(sl::shm_transport::destination_kinds == sl::memory_kinds{sl::memory_kind::host});
  asio::io_context io;
  sl::shm_transport t(io.get_executor());
  std::vector<std::byte> staging(128);
  CHECK(t.register_memory(staging).region().location == sl::memory_location::host());
  auto pinned = t.register_memory(staging, sl::memory_location::host_pinned());
  CHECK(pinned.region().location == sl::memory_location::host_pinned());
  CHECK(pinned.region().size == 128);
  auto e = thrown_by([&] { (void)t.register_memory(staging, sl::memory_location::cuda(1)); });
  REQUIRE(e);
  CHECK(e->first == sl::errc::unsupported_memory);
  CHECK(e->second ==
        "staging memory is cuda_device:1 memory, which the shm transport cannot move (it moves {host, "
        "host_pinned}): memory kind not supported");
}

TEST_CASE("shm_transport: a cancelled queued write copies nothing and the next write lands; close() aborts, then not_connected") {
  const auto path = socket_path("cancel");
  const std::size_t part = 16 << 20;
  const pid_t child = spawn([&] {
    return serve(path, 4 * part, {{"a", 0, part}, {"b", part, part}, {"c", 2 * part, part}, {"d", 3 * part, part}},
                 [&](std::error_code ec, sl::notice n, std::span<std::byte> arena) {
                   if (ec) return 50;
                   if (!holds_pattern(arena.subspan(0, part), 4)) return 51;
                   if (!holds_pattern(arena.subspan(part, part), 4)) return 52;
                   if (n.version == 1) return -1;  // the sender may already be copying d
                   if (!all_zero(arena.subspan(2 * part, part))) return 53;
                   return holds_pattern(arena.subspan(3 * part, part), 4) ? 0 : 54;
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
  std::vector<sl::write_request> wd{{src, 0, table.find("d")->address, 0}};
  completion_log log;
  asio::cancellation_signal signal;
  conn->async_write(wa, log.handler());
  conn->async_write(wb, log.handler());
  std::optional<std::error_code> cancelled;
  conn->async_write(wc, asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) { cancelled = ec; }));
  signal.emit(asio::cancellation_type::terminal);  // c has not started: a is copying
  std::optional<std::error_code> notified;
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { notified = ec; });
  REQUIRE(run_until(io, [&] { return notified.has_value() && cancelled.has_value() && log.codes.size() == 2; }));
  CHECK(*notified == std::error_code{});
  // c was aborted before it started (whether a's completion ran before its cancellation or
  // after depends on the machine's load); a and b landed.
  CHECK(*cancelled == asio::error::operation_aborted);
  REQUIRE(log.codes.size() == 2);
  CHECK(log.codes[0] == std::error_code{});
  CHECK(log.codes[1] == std::error_code{});
  CHECK(conn->is_open());
  // The connection is intact: the next write lands (the receiver checks, at notice 2, that
  // d holds it and that c is still untouched).
  log.codes.clear();
  notified.reset();
  conn->async_write(wd, log.handler());
  conn->async_notify(sl::notice_kind::commit, 2, [&](std::error_code ec) { notified = ec; });
  REQUIRE(run_until(io, [&] { return notified.has_value() && log.codes.size() == 1; }));
  CHECK(log.codes[0] == std::error_code{});
  CHECK(*notified == std::error_code{});
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
  CHECK(later->message() == "not connected");
}

TEST_CASE("shm_transport: close() aborts queued and copying writes and a queued notice on a live link") {
  const auto path = socket_path("close");
  const std::size_t bytes = 32 << 20;
  const pid_t child = spawn([&] {
    return serve(path, bytes, {{"w", 0, bytes}}, [](std::error_code ec, sl::notice n, std::span<std::byte>) {
      // The sender closed: we see it, named.
      return ec == sl::errc::peer_disconnected && n == sl::notice{6, sl::notice_kind::abort, 0} ? 0 : 60;
    });
  });
  asio::io_context io;
  sl::shm_options o;
  o.chunk_bytes = 1 << 20;
  sl::shm_transport t(io.get_executor(), o);
  auto conn = connect(io, t, path, {6, 0});
  REQUIRE(conn);
  auto src = patterned(bytes, 1);
  std::vector<sl::write_request> batch{{src, 0, conn->remote_regions().find("w")->address, 0}};
  completion_log log;
  for (int i = 0; i < 5; ++i) conn->async_write(batch, log.handler());
  conn->async_notify(sl::notice_kind::commit, 1, log.handler());
  conn->close();
  REQUIRE(run_until(io, [&] { return log.codes.size() == 6; }));
  for (auto ec : log.codes) CHECK(ec == asio::error::operation_aborted);
  CHECK(wait_child(child) == 0);
}

namespace {
asio::awaitable<void> awaited_write(connection& c, std::vector<sl::write_request> batch, std::uint32_t version) {
  co_await c.async_write(batch, asio::use_awaitable);
  co_await c.async_notify(sl::notice_kind::commit, version, asio::use_awaitable);
}
}  // namespace

TEST_CASE("shm_transport: callback, use_future, deferred and use_awaitable all complete") {
  const auto path = socket_path("tokens");
  const std::size_t part = 1 << 20;
  const pid_t child = spawn([&] {
    return serve(path, 4 * part, {{"cb", 0, part}, {"fut", part, part}, {"def", 2 * part, part}, {"aw", 3 * part, part}},
                 [&](std::error_code ec, sl::notice n, std::span<std::byte> arena) {
                   if (ec || n.version != 4) return 70;
                   for (unsigned i = 0; i < 4; ++i)
                     if (!holds_pattern(arena.subspan(i * part, part), 20 + i)) return 71 + int(i);
                   return 0;
                 });
  });
  asio::io_context io;
  sl::shm_transport t(io.get_executor());
  std::optional<connection> conn;
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
