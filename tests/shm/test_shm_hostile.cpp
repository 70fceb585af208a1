#include <shardline/transport/shm/transport.hpp>

#include <shardline/detail/codec.hpp>
#include <shardline/transport/detail/control.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include "shm_support.hpp"

#include "../support/checks.hpp"

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <fcntl.h>
#include <grp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

// What a hostile process of the same host can do to a receiver (connect as another user,
// connect and leave, stall, send garbage, take over its socket path) and a hostile receiver
// to a sender (unsealed or shrinking arenas, huge claims). Every case ends with the
// legitimate side still working, its bytes checked.

namespace sl = shardline;
using namespace std::chrono_literals;

namespace {

using namespace shm_test;
using shm_test::raw_send;  // overloaded below for text
using clock_type = std::chrono::steady_clock;
using connection = sl::shm_transport::connection;

constexpr uid_t nobody = 65534;
constexpr gid_t nogroup = 65534;

std::string socket_path(const char* tag) {
  return "/tmp/shardline-hostile-" + std::to_string(getpid()) + "-" + tag + ".sock";
}

/// Every async_accept's result, accepting again after each until the receiver closes.
struct accept_loop {
  explicit accept_loop(sl::shm_transport::receiver& r) : receiver(r) { next(); }
  void next() {
    receiver.async_accept([this, alive = alive](std::error_code ec, std::uint32_t sender) {
      if (!*alive || ec == asio::error::operation_aborted || ec == sl::errc::not_connected) return;
      results.emplace_back(ec, sender);
      next();
    });
  }
  ~accept_loop() { *alive = false; }
  /// How many completed with a code equal to `e` (an error code, or a std::errc condition).
  template <class E>
  std::size_t count(E e) const {
    return static_cast<std::size_t>(std::count_if(results.begin(), results.end(), [&](auto& r) { return r.first == e; }));
  }
  sl::shm_transport::receiver& receiver;
  std::vector<std::pair<std::error_code, std::uint32_t>> results;
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);
};

struct event {
  std::error_code ec;
  sl::notice n;
};

/// The legitimate trainer, in this process: connects as `sender`, writes `seed`'s pattern
/// over region "w" and commits `version`; the receiver must report that commit (events before
/// it are returned) and hold every byte.
std::vector<event> legitimate_update(asio::io_context& io, sl::shm_transport::receiver& r, std::span<std::byte> w,
                                     const std::string& path, std::uint32_t sender, std::uint32_t version,
                                     unsigned seed) {
  std::vector<event> before;
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, connection> connected;
  t.async_connect(path, {sender, 0}, connected.handler());
  REQUIRE(run_until(io, [&] { return connected.ready(); }));
  REQUIRE_MESSAGE(connected.code() == std::error_code{}, t.last_connect_failure());
  auto& conn = std::get<1>(connected.get());
  const auto* region = conn.remote_regions().find("w");
  REQUIRE(region);
  REQUIRE(region->length == w.size());
  const auto source = patterned(w.size(), seed);
  const sl::write_request write{source, 0, region->address, region->key};
  std::vector<std::error_code> codes;
  conn.async_write(std::span(&write, 1), [&](std::error_code ec) { codes.push_back(ec); });
  conn.async_notify(sl::notice_kind::commit, version, [&](std::error_code ec) { codes.push_back(ec); });
  for (;;) {
    outcome<std::error_code, sl::notice> got;
    r.async_wait_notification(got.handler());
    REQUIRE(run_until(io, [&] { return got.ready(); }));
    auto [ec, n] = got.get();
    if (!ec && n == sl::notice{sender, sl::notice_kind::commit, version}) break;
    before.push_back({ec, n});
  }
  REQUIRE(run_until(io, [&] { return codes.size() == 2; }));
  CHECK(codes[0] == std::error_code{});
  CHECK(codes[1] == std::error_code{});
  CHECK(holds_pattern(w, seed));
  return before;
}

// ---- raw peers: bytes by hand, as a hostile process would send them ----

int raw_client(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, path.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const int e = errno;
    ::close(fd);
    errno = e;
    return -1;
  }
  timeval guard{20, 0};  // a read that never gets its bytes fails instead of hanging
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard);
  return fd;
}

bool raw_send(int fd, std::string_view bytes) { return raw_send(fd, std::as_bytes(std::span(bytes))); }

/// Everything the peer sends until it hangs up, and how many descriptors came with it
/// (closed here). nullopt on a read error (the guard's timeout included).
struct received {
  std::string bytes;
  std::size_t descriptors = 0;
};
std::optional<received> raw_read_to_end(int fd) {
  received all;
  for (;;) {
    char buf[4096];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 253)];
    iovec iov{buf, sizeof buf};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    // A receiver that hung up on bytes we sent and it never read resets the connection after
    // what it sent us was read: that is its end too.
    if (n < 0 && errno == ECONNRESET) return all;
    if (n < 0) return std::nullopt;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
        for (std::size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); ++i) {
          int got;
          std::memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          ::close(got);
          ++all.descriptors;
        }
    if (n == 0) return all;
    all.bytes.append(buf, static_cast<std::size_t>(n));
  }
}

std::error_code verdict_in(const std::string& bytes) {
  if (bytes.size() < sl::detail::verdict_bytes) return make_error_code(sl::errc::protocol_error);
  std::array<std::byte, sl::detail::verdict_bytes> v{};
  std::memcpy(v.data(), bytes.data(), v.size());
  return sl::detail::decode_verdict(v);
}

/// Forks; the child runs `body` and _exits with its result (97: it threw).
pid_t spawn(const std::function<int()>& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 97;
    try {
      rc = body();
    } catch (...) {
    }
    ::_exit(rc);
  }
  return pid;
}

/// Runs the parent's handlers until the child exits; its exit status, -1 if it hung.
int child_status(asio::io_context& io, pid_t pid) {
  int status = 0;
  bool ended = false;
  run_until(io, [&] { return ended = ended || ::waitpid(pid, &status, WNOHANG) == pid; }, 30s);
  if (!ended) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/// Only root can start a process of another uid: elsewhere those tests say they skipped.
bool can_become_another_uid() {
  if (::geteuid() == 0) return true;
  MESSAGE("skipped: a peer of another uid needs the tests to run as root (setuid to nobody)");
  return false;
}

/// In a forked child: becomes nobody for good.
bool become_nobody() {
  return ::setgroups(0, nullptr) == 0 && ::setgid(nogroup) == 0 && ::setuid(nobody) == 0 && ::getuid() == nobody;
}

/// A receiver that can listen at `path` in this process, with one 64 KiB region "w".
struct served_receiver {
  served_receiver(asio::io_context& io, const std::string& path, sl::shm_options o = {})
      : r(io.get_executor(), path, o), w(r.allocate(64 << 10)) {
    r.expose("w", w);
  }
  sl::shm_transport::receiver r;
  std::span<std::byte> w;
};

// ---- a hand-written receiver, to hand a sender what a real one never would ----

struct fake_arena {
  unsigned memfd_flags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
  int seals = sl::detail::arena_seals;
  bool regular_file = false;                   // a file of /tmp instead of a memfd
  std::size_t file_bytes = 64 << 10;           // the file's size
  std::uint64_t claimed_bytes = 64 << 10;      // what the payload says the arena holds
  std::uint64_t region_bytes = 64 << 10;       // region "w", at the arena's start
  std::optional<std::uint64_t> announced;      // the header's payload length, when a lie
};

/// Admits one sender and hands it `spec`'s arena and region "w"; on the first notice tries to
/// shrink and to grow the arena (recording errno), then echoes every notice until the sender
/// leaves.
class fake_receiver {
public:
  static constexpr std::uint64_t base = 0x7f0000000000;

  fake_receiver(const std::string& path, fake_arena spec) : path_(path) {
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ::unlink(path.c_str());
    REQUIRE(::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener_, 4) == 0);
    if (spec.regular_file) arena_ = sl::detail::unique_fd(::open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    else arena_ = sl::detail::unique_fd(::memfd_create("hostile-arena", spec.memfd_flags));
    REQUIRE(arena_.valid());
    REQUIRE(::ftruncate(arena_.get(), static_cast<off_t>(spec.file_bytes)) == 0);
    if (spec.seals) REQUIRE(::fcntl(arena_.get(), F_ADD_SEALS, spec.seals) == 0);
    std::error_code ec;
    map_ = sl::detail::mapping::map_shared(arena_.get(), spec.file_bytes, 0, ec);
    REQUIRE_FALSE(ec);
    thread_ = std::thread([this, spec] { serve(spec); });
  }
  ~fake_receiver() {
    ::shutdown(listener_, SHUT_RDWR);  // ends an accept nobody answered
    thread_.join();
    ::close(listener_);
    ::unlink(path_.c_str());
  }

  std::span<const std::byte> arena() const { return map_.bytes(); }
  /// Bytes of the arena's file that hold pages (faulted in by anyone).
  std::uint64_t resident_bytes() const {
    struct stat st {};
    ::fstat(arena_.get(), &st);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
  }
  std::atomic<int> shrink_errno{-1}, grow_errno{-1};

private:
  void serve(const fake_arena& spec) {
    const int fd = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    timeval guard{20, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard);
    sl::detail::hello_frame hello{};
    if (::recv(fd, hello.data(), hello.size(), MSG_WAITALL) == static_cast<ssize_t>(hello.size())) {
      raw_send(fd, sl::detail::encode_verdict({}));
      std::string payload;
      sl::detail::put_le<std::uint64_t>(payload, base);
      sl::detail::put_le<std::uint64_t>(payload, spec.claimed_bytes);
      payload += sl::region_table({{"w", base, spec.region_bytes, 0, {}, {}}}).serialize();
      std::string header = "SLSH";
      sl::detail::put_le<std::uint32_t>(header, 1);
      sl::detail::put_le<std::uint64_t>(header, spec.announced.value_or(payload.size()));
      const int fds[] = {arena_.get()};
      if (!sl::detail::send_with_fds(fd, std::as_bytes(std::span(header)), fds) && raw_send(fd, payload)) {
        sl::detail::notice_frame frame{};
        for (bool first = true; ::recv(fd, frame.data(), frame.size(), MSG_WAITALL) == 8; first = false) {
          if (first) {
            shrink_errno = ::ftruncate(arena_.get(), 0) == 0 ? 0 : errno;
            grow_errno = ::ftruncate(arena_.get(), static_cast<off_t>(2 * spec.file_bytes)) == 0 ? 0 : errno;
          }
          raw_send(fd, frame);
        }
      }
    }
    ::close(fd);
  }

  std::string path_;
  int listener_ = -1;
  sl::detail::unique_fd arena_;
  sl::detail::mapping map_;
  std::thread thread_;
};

std::pair<std::error_code, std::optional<connection>> connect_once(asio::io_context& io, sl::shm_transport& t,
                                                                   const std::string& path) {
  outcome<std::error_code, connection> done;
  t.async_connect(path, done.handler());
  if (!run_until(io, [&] { return done.ready(); })) return {std::make_error_code(std::errc::timed_out), std::nullopt};
  auto& [ec, c] = done.get();
  if (ec) return {ec, std::nullopt};
  return {ec, std::move(c)};
}

}  // namespace

// ---- who may connect ---------------------------------------------------------------------

TEST_CASE("shm hostile: the socket file is created 0600 whatever the umask") {
  asio::io_context io;
  for (const mode_t mask : {mode_t(0), mode_t(022), mode_t(077)}) {
    CAPTURE(mask);
    const auto path = socket_path("mode");
    const mode_t before = ::umask(mask);
    std::optional<sl::shm_transport::receiver> r;
    r.emplace(io.get_executor(), path);
    ::umask(before);
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 07777) == 0600);
  }
}

TEST_CASE("shm hostile: a process of another uid gets nothing, and the legitimate sender then updates") {
  if (!can_become_another_uid()) return;
  const auto path = socket_path("uid");
  asio::io_context io;
  sl::shm_options o;
  o.connect_timeout = 2s;
  served_receiver s(io, path, o);
  accept_loop accepts(s.r);

  SUBCASE("the socket file's mode keeps it from connecting at all") {
    const pid_t child = spawn([&] {
      if (!become_nobody()) return 10;
      if (raw_client(path) >= 0) return 11;
      if (errno != EACCES) return 12;
      asio::io_context child_io;
      sl::shm_transport t(child_io.get_executor());
      auto [ec, conn] = connect_once(child_io, t, path);
      if (ec != std::errc::permission_denied) return 13;
      if (t.last_connect_failure().find("connecting to '" + path + "'") == std::string::npos) return 14;
      return 0;
    });
    CHECK(child_status(io, child) == 0);
    CHECK(accepts.results.empty());
  }

  SUBCASE("with the file opened to everyone, its credentials refuse it: a verdict, then end of file") {
    REQUIRE(::chmod(path.c_str(), 0666) == 0);
    const pid_t child = spawn([&] {
      if (!become_nobody()) return 10;
      const int fd = raw_client(path);
      if (fd < 0) return 11;
      if (!raw_send(fd, sl::detail::encode_hello("SLSH", {0, 0}))) return 12;
      const auto reply = raw_read_to_end(fd);
      ::close(fd);
      if (!reply) return 13;
      if (reply->descriptors != 0) return 14;  // no arena
      if (reply->bytes.size() != sl::detail::verdict_bytes) return 15;  // no region table
      if (verdict_in(reply->bytes) != sl::errc::peer_not_allowed) return 16;
      asio::io_context child_io;
      sl::shm_transport t(child_io.get_executor());
      auto [ec, conn] = connect_once(child_io, t, path);
      if (ec != sl::errc::peer_not_allowed) return 17;
      return 0;
    });
    CHECK(child_status(io, child) == 0);
    REQUIRE(run_until(io, [&] { return accepts.results.size() == 2; }));
    CHECK(accepts.count(std::errc::permission_denied) == 2);
    sl::testing::check_text(s.r.last_refusal(), "only uid 0 may connect",
                            {"shm receiver '" + path + "'", "refused peer pid " + std::to_string(child), "uid 65534",
                             "gid 65534"});
  }

  auto before = legitimate_update(io, s.r, s.w, path, 0, 1, 1);
  CHECK(before.empty());
  CHECK(accepts.results.back() == std::pair{std::error_code{}, 0u});
}

TEST_CASE("shm hostile: allow_peer admits another uid it names, and still refuses the rest") {
  if (!can_become_another_uid()) return;
  const auto path = socket_path("allow");
  asio::io_context io;
  sl::shm_options o;
  o.allow_peer = [](const sl::shm_peer_credentials& p) { return p.uid == nobody; };
  served_receiver s(io, path, o);
  REQUIRE(::chmod(path.c_str(), 0666) == 0);  // the operator's part: let that uid reach the file
  accept_loop accepts(s.r);
  const pid_t child = spawn([&] {
    if (!become_nobody()) return 10;
    asio::io_context child_io;
    sl::shm_transport t(child_io.get_executor());
    auto [ec, conn] = connect_once(child_io, t, path);
    if (ec) return 11;
    const auto* w = conn->remote_regions().find("w");
    if (!w) return 12;
    const auto source = patterned(w->length, 5);
    const sl::write_request write{source, 0, w->address, w->key};
    std::vector<std::error_code> codes;
    conn->async_write(std::span(&write, 1), [&](std::error_code e) { codes.push_back(e); });
    conn->async_notify(sl::notice_kind::commit, 9, [&](std::error_code e) { codes.push_back(e); });
    if (!run_until(child_io, [&] { return codes.size() == 2; })) return 13;
    return codes[0] || codes[1] ? 14 : 0;
  });
  outcome<std::error_code, sl::notice> got;
  s.r.async_wait_notification(got.handler());
  REQUIRE(run_until(io, [&] { return got.ready(); }));
  CHECK(got.get() == std::tuple{std::error_code{}, sl::notice{0, sl::notice_kind::commit, 9}});
  CHECK(holds_pattern(s.w, 5));
  CHECK(child_status(io, child) == 0);
  // This process (uid 0) is not among those allow_peer names.
  sl::shm_transport t(io.get_executor());
  CHECK(connect_once(io, t, path).first == sl::errc::peer_not_allowed);
  REQUIRE(run_until(io, [&] { return accepts.results.size() == 2; }));
  CHECK(accepts.results[1].first == std::errc::permission_denied);
  sl::testing::check_text(s.r.last_refusal(), "shm_options::allow_peer does not allow it",
                          {"shm receiver '" + path + "'", "refused peer pid " + std::to_string(getpid()), "uid 0"});
}

// ---- a listener that outlives bad peers ----------------------------------------------------

TEST_CASE("shm hostile: 1,000 connect-and-close, silent, garbage, truncated, oversized and refused peers; then the "
          "legitimate sender updates") {
  const auto path = socket_path("listener");
  asio::io_context io;
  sl::shm_options o;
  o.connect_timeout = 200ms;
  served_receiver s(io, path, o);
  s.r.admit({2, 0});  // senders 0 and 1
  accept_loop accepts(s.r);
  std::map<std::string, std::optional<received>> seen;  // what each kind of peer read back
  std::atomic<bool> done{false};
  std::thread hostile([&] {
    for (int i = 0; i < 1000; ++i) {
      const int fd = raw_client(path);
      if (fd >= 0) ::close(fd);
    }
    auto peer = [&](const std::string& kind, const std::function<void(int)>& act) {
      const int fd = raw_client(path);
      if (fd < 0) return;
      act(fd);
      seen[kind] = raw_read_to_end(fd);
      ::close(fd);
    };
    peer("silent", [](int) {});
    peer("garbage", [](int fd) { raw_send(fd, std::string(64, '\xab')); });
    peer("truncated", [](int fd) {
      const auto hello = sl::detail::encode_hello("SLSH", {1, 0});
      raw_send(fd, std::span(hello).first(10));
      ::shutdown(fd, SHUT_WR);
    });
    peer("oversized", [](int fd) {
      const auto hello = sl::detail::encode_hello("SLSH", {1, 0});
      raw_send(fd, hello);
      raw_send(fd, std::string(1 << 20, '\xab'));  // fails once the receiver drops it
    });
    peer("refused", [](int fd) { raw_send(fd, sl::detail::encode_hello("SLSH", {7, 0})); });
    done = true;
  });
  const bool finished = run_until(io, [&] { return done.load(); }, 120s);
  hostile.join();
  REQUIRE(finished);
  REQUIRE(run_until(io, [&] { return accepts.results.size() == 1005; }));
  CHECK(accepts.count(sl::errc::peer_disconnected) == 1001);  // and the truncated hello
  CHECK(accepts.count(std::errc::timed_out) == 1);
  CHECK(accepts.count(sl::errc::protocol_error) == 1);
  CHECK(accepts.count(sl::errc::unknown_sender) == 1);
  CHECK(accepts.count(std::error_code{}) == 1);  // the oversized hello is a hello, then garbage
  REQUIRE(seen["silent"]);
  CHECK(seen["silent"]->bytes.empty());
  REQUIRE(seen["garbage"]);
  CHECK(seen["garbage"]->bytes.size() == sl::detail::verdict_bytes);
  CHECK(verdict_in(seen["garbage"]->bytes) == sl::errc::protocol_error);
  CHECK(seen["garbage"]->descriptors == 0);
  REQUIRE(seen["refused"]);
  CHECK(verdict_in(seen["refused"]->bytes) == sl::errc::unknown_sender);
  CHECK(seen["refused"]->descriptors == 0);
  // The listener is the one it started with: the legitimate sender connects and updates.
  auto before = legitimate_update(io, s.r, s.w, path, 0, 1, 3);
  REQUIRE(before.size() == 1);  // the oversized peer's garbage, never a notice
  CHECK(before[0].ec == sl::errc::protocol_error);
  CHECK(before[0].n == sl::notice{1, sl::notice_kind::abort, 0});
}

TEST_CASE("shm hostile: silent peers hold only their own handshakes; the legitimate sender behind them updates") {
  const auto path = socket_path("silent-first");
  asio::io_context io;
  sl::shm_options o;
  // An hour: were the listener held by a silent peer, the sender's own deadline (10 s) and the
  // test's hang guard would fail this long before.
  o.connect_timeout = std::chrono::hours(1);
  served_receiver s(io, path, o);
  accept_loop accepts(s.r);
  // Connected first, so accepted first (the backlog is first in, first out).
  std::vector<int> silent;
  for (int i = 0; i < 3; ++i) silent.push_back(raw_client(path));
  for (const int fd : silent) REQUIRE(fd >= 0);
  CHECK(legitimate_update(io, s.r, s.w, path, 0, 1, 21).empty());
  REQUIRE(accepts.results.size() == 1);  // the sender's; the silent peers' handshakes still run
  CHECK(accepts.results[0] == std::pair{std::error_code{}, 0u});
  for (const int fd : silent) ::close(fd);
  REQUIRE(run_until(io, [&] { return accepts.results.size() == 4; }));
  CHECK(accepts.count(sl::errc::peer_disconnected) == 3);
}

TEST_CASE("shm hostile: past max_pending_handshakes new peers wait in the backlog, and are served once one ends") {
  const auto path = socket_path("pending-limit");
  asio::io_context io;
  sl::shm_options o;
  o.connect_timeout = std::chrono::hours(1);
  o.max_pending_handshakes = 2;
  served_receiver s(io, path, o);
  accept_loop accepts(s.r);
  const int first = raw_client(path), second = raw_client(path);
  REQUIRE(first >= 0);
  REQUIRE(second >= 0);
  // A third peer is not accepted while both handshakes run: its hello is never answered.
  sl::shm_transport t(io.get_executor());
  outcome<std::error_code, connection> connected;
  t.async_connect(path, {0, 0}, connected.handler());
  for (int i = 0; i < 50; ++i) io.poll();
  CHECK_FALSE(connected.ready());
  ::close(first);  // one handshake ends: room for the sender
  REQUIRE(run_until(io, [&] { return connected.ready(); }));
  REQUIRE_MESSAGE(connected.code() == std::error_code{}, t.last_connect_failure());
  REQUIRE(run_until(io, [&] { return accepts.results.size() == 2; }));
  CHECK(accepts.results[0].first == sl::errc::peer_disconnected);
  CHECK(accepts.results[1] == std::pair{std::error_code{}, 0u});
  ::close(second);
}

// ---- never delete another live receiver's socket -------------------------------------------

TEST_CASE("shm hostile: a receiver on a live receiver's path fails naming it; the live one keeps working") {
  const auto path = socket_path("live");
  asio::io_context io;
  served_receiver live(io, path);
  accept_loop accepts(live.r);
  try {
    sl::shm_transport::receiver second(io.get_executor(), path);
    FAIL("a second receiver took a live receiver's path");
  } catch (const sl::error& e) {
    CHECK(e.code() == std::errc::address_in_use);
    sl::testing::check_text(e.what(), std::make_error_code(std::errc::address_in_use).message(),
                            {"shm receiver: socket '" + path + "' belongs to a live receiver"});
  }
  struct stat st {};
  CHECK(::lstat(path.c_str(), &st) == 0);
  legitimate_update(io, live.r, live.w, path, 0, 1, 4);
  // The probe was a peer that left at once.
  CHECK(accepts.results.front().first == sl::errc::peer_disconnected);
}

TEST_CASE("shm hostile: a stale socket file is replaced, anything else at the path is left alone") {
  asio::io_context io;
  SUBCASE("a socket file nobody listens on") {
    const auto path = socket_path("stale");
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    ::close(fd);
    served_receiver s(io, path);
    accept_loop accepts(s.r);
    legitimate_update(io, s.r, s.w, path, 0, 1, 6);
  }
  SUBCASE("a file that is not a socket") {
    const auto path = socket_path("file");
    const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    ::close(fd);
    try {
      sl::shm_transport::receiver r(io.get_executor(), path);
      FAIL("bound over a regular file");
    } catch (const sl::error& e) {
      CHECK(e.code() == std::errc::address_in_use);
      sl::testing::check_text(e.what(), std::make_error_code(std::errc::address_in_use).message(),
                              {"shm receiver: cannot bind socket '" + path + "'"});
    }
    struct stat st {};
    CHECK(::lstat(path.c_str(), &st) == 0);
    CHECK(S_ISREG(st.st_mode));
    ::unlink(path.c_str());
  }
  SUBCASE("a closing receiver leaves a successor's file at its path alone") {
    const auto path = socket_path("successor");
    std::optional<served_receiver> first(std::in_place, io, path);
    ::unlink(path.c_str());  // someone removed its file
    served_receiver second(io, path);
    first.reset();
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    accept_loop accepts(second.r);
    legitimate_update(io, second.r, second.w, path, 0, 1, 7);
  }
}

// ---- shared memory that cannot be pulled away ----------------------------------------------

TEST_CASE("shm hostile: a receiver's arenas are sealed against resizing before anyone sees them") {
  asio::io_context io;
  const auto path = socket_path("sealed");
  served_receiver s(io, path);
  accept_loop accepts(s.r);
  // A raw peer takes the arena's descriptor as a sender would and tries to resize it.
  const int fd = raw_client(path);
  REQUIRE(fd >= 0);
  REQUIRE(raw_send(fd, sl::detail::encode_hello("SLSH", {0, 0})));
  REQUIRE(run_until(io, [&] { return accepts.results.size() == 1; }));
  std::array<std::byte, sl::detail::verdict_bytes> verdict{};
  REQUIRE(::recv(fd, verdict.data(), verdict.size(), MSG_WAITALL) == 4);
  std::array<std::byte, sl::detail::shm_header_bytes> header{};
  std::vector<sl::detail::unique_fd> fds;
  bool truncated = false;
  std::error_code ec;
  REQUIRE(sl::detail::receive_with_fds(fd, header, fds, truncated, ec) == header.size());
  REQUIRE(fds.size() == 1);
  CHECK(::fcntl(fds[0].get(), F_GET_SEALS) == sl::detail::arena_seals);
  CHECK(::ftruncate(fds[0].get(), 0) != 0);
  CHECK(errno == EPERM);
  CHECK(::ftruncate(fds[0].get(), 1 << 20) != 0);
  CHECK(::fcntl(fds[0].get(), F_ADD_SEALS, F_SEAL_WRITE) != 0);  // F_SEAL_SEAL: nothing more
  ::close(fd);
  legitimate_update(io, s.r, s.w, path, 0, 1, 8);
}

TEST_CASE("shm hostile: a sender refuses an arena that is not sealed against resizing, naming it") {
  asio::io_context io;
  const auto path = socket_path("unsealed");
  sl::shm_transport t(io.get_executor());
  auto refused = [&](fake_arena spec, const std::string& has) {
    fake_receiver fake(path, spec);
    auto [ec, conn] = connect_once(io, t, path);
    CHECK(ec == sl::errc::unsupported_memory);
    sl::testing::check_text(t.last_connect_failure(), "memory kind not supported",
                            {"shm sender: connecting to '" + path + "'",
                             "arena 0 (65536 bytes) is not sealed against resizing: it has seals " + has,
                             "it needs F_SEAL_SEAL|F_SEAL_SHRINK|F_SEAL_GROW"});
  };
  SUBCASE("a memfd that cannot be sealed") {
    refused({.memfd_flags = MFD_CLOEXEC, .seals = 0}, "F_SEAL_SEAL");
  }
  SUBCASE("a memfd sealed against shrinking only") {
    refused({.seals = F_SEAL_SHRINK}, "F_SEAL_SHRINK");
  }
  SUBCASE("a memfd that was never sealed") {
    refused({.seals = 0}, "none");
  }
  SUBCASE("a file that is no memfd") {
    fake_receiver fake(path, {.seals = 0, .regular_file = true});
    auto [ec, conn] = connect_once(io, t, path);
    CHECK(ec == sl::errc::unsupported_memory);
    CHECK(t.last_connect_failure().find("arena 0 (65536 bytes) is not sealed against resizing") != std::string::npos);
  }
}

TEST_CASE("shm hostile: a receiver that tries to shrink or grow its arena after connect cannot; the sender's "
          "writes land") {
  asio::io_context io;
  const auto path = socket_path("shrink");
  sl::shm_transport t(io.get_executor());
  fake_receiver fake(path, {});
  auto [ec, conn] = connect_once(io, t, path);
  REQUIRE(ec == std::error_code{});
  std::vector<std::error_code> codes;
  conn->async_notify(sl::notice_kind::begin, 1, [&](std::error_code e) { codes.push_back(e); });
  REQUIRE(run_until(io, [&] { return codes.size() == 1; }));  // the fake tried both by now
  CHECK(fake.shrink_errno == EPERM);
  CHECK(fake.grow_errno == EPERM);
  const auto* w = conn->remote_regions().find("w");
  REQUIRE(w);
  const auto source = patterned(w->length, 9);
  const sl::write_request write{source, 0, w->address, w->key};
  conn->async_write(std::span(&write, 1), [&](std::error_code e) { codes.push_back(e); });
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { codes.push_back(e); });
  REQUIRE(run_until(io, [&] { return codes.size() == 3; }));
  CHECK(codes == std::vector<std::error_code>(3));
  CHECK(holds_pattern(fake.arena(), 9));
}

TEST_CASE("shm hostile: pre-faulting is bounded by the exposed regions, not by the arena a receiver claims") {
  asio::io_context io;
  const auto path = socket_path("claim");
  sl::shm_transport t(io.get_executor());
  const std::size_t region = 256 << 10;
  fake_receiver fake(path, {.file_bytes = std::size_t(1) << 30, .claimed_bytes = std::uint64_t(1) << 30,
                            .region_bytes = region});
  auto [ec, conn] = connect_once(io, t, path);
  REQUIRE(ec == std::error_code{});
  // The region's pages are in (pre-faulted), the rest of the GiB is not.
  CHECK(fake.resident_bytes() >= region);
  CHECK(fake.resident_bytes() < 4 * region);
}

TEST_CASE("shm hostile: a receiver announcing a handshake past max_handshake_bytes is refused before anything is "
          "allocated") {
  asio::io_context io;
  const auto path = socket_path("huge");
  sl::shm_options o;
  o.max_handshake_bytes = 1 << 20;
  o.connect_timeout = 500ms;
  sl::shm_transport t(io.get_executor(), o);
  SUBCASE("past the limit: protocol_error at once") {
    fake_receiver fake(path, {.announced = (std::uint64_t(1) << 20) + 1});
    CHECK(connect_once(io, t, path).first == sl::errc::protocol_error);
    sl::testing::check_text(t.last_connect_failure(), "protocol error",
                            {"connecting to '" + path + "'", "the receiver announced 1048577 bytes",
                             "shm_options::max_handshake_bytes (1048576)"});
  }
  SUBCASE("within it but never sent: the deadline") {
    fake_receiver fake(path, {.announced = 1 << 20});
    CHECK(connect_once(io, t, path).first == std::errc::timed_out);
  }
}

// ---- framed commits ------------------------------------------------------------------------

TEST_CASE("shm hostile: garbage or a cut notice on an admitted connection never reaches the receiver as a notice") {
  const auto path = socket_path("framed");
  asio::io_context io;
  served_receiver s(io, path);
  s.r.admit({2, 0});
  accept_loop accepts(s.r);
  const int fd = raw_client(path);
  REQUIRE(fd >= 0);
  REQUIRE(raw_send(fd, sl::detail::encode_hello("SLSH", {1, 0})));
  REQUIRE(run_until(io, [&] { return accepts.results.size() == 1; }));
  REQUIRE(accepts.results[0] == std::pair{std::error_code{}, 1u});
  std::error_code expected;
  SUBCASE("bytes that are no notice") {
    REQUIRE(raw_send(fd, std::string_view("GET / HTTP/1.1\r\n\r\n")));
    expected = make_error_code(sl::errc::protocol_error);
  }
  SUBCASE("a notice cut short by the peer's exit") {
    const auto frame = sl::detail::encode_notice(sl::notice_kind::commit, 891736879);
    REQUIRE(raw_send(fd, std::span(frame).first(5)));
    ::shutdown(fd, SHUT_WR);
    expected = make_error_code(sl::errc::peer_disconnected);
  }
  outcome<std::error_code, sl::notice> got;
  s.r.async_wait_notification(got.handler());
  REQUIRE(run_until(io, [&] { return got.ready(); }));
  CHECK(got.get() == std::tuple{expected, sl::notice{1, sl::notice_kind::abort, 0}});
  const auto rest = raw_read_to_end(fd);  // the handshake, then the receiver hung up
  ::close(fd);
  REQUIRE(rest);
  CHECK(rest->descriptors == 1);
  CHECK(legitimate_update(io, s.r, s.w, path, 0, 2, 10).empty());
}

TEST_CASE("shm hostile: through weights_receiver, a begin at or below the committed version is refused and an old "
          "commit announces nothing") {
  const auto path = socket_path("stale-version");
  asio::io_context io;
  sl::shm_transport::receiver endpoint(io.get_executor(), path);
  sl::weights_receiver<sl::shm_transport::receiver> weights(endpoint, {{"w", sl::dtype::bf16, {4096}}});
  accept_loop accepts(endpoint);
  sl::shm_transport t(io.get_executor());
  auto [ec, conn] = connect_once(io, t, path);
  REQUIRE(ec == std::error_code{});
  const auto* w = conn->remote_regions().find("w");
  REQUIRE(w);
  auto notify = [&](sl::notice_kind kind, std::uint32_t version) {
    std::optional<std::error_code> done;
    conn->async_notify(kind, version, [&](std::error_code e) { done = e; });
    REQUIRE(run_until(io, [&] { return done.has_value(); }));
    CHECK(*done == std::error_code{});
  };
  auto update = [&](std::uint32_t version, unsigned seed) {
    const auto source = patterned(w->length, seed);
    const sl::write_request write{source, 0, w->address, w->key};
    notify(sl::notice_kind::begin, version);
    std::optional<std::error_code> written;
    conn->async_write(std::span(&write, 1), [&](std::error_code e) { written = e; });
    REQUIRE(run_until(io, [&] { return written.has_value(); }));
    notify(sl::notice_kind::commit, version);
  };
  auto wait_commit = [&] {
    outcome<std::error_code, std::uint32_t> got;
    weights.async_wait_commit(got.handler());
    REQUIRE(run_until(io, [&] { return got.ready(); }));
    return got.get();
  };
  update(5, 11);
  CHECK(wait_commit() == std::tuple{std::error_code{}, 5u});
  CHECK(holds_pattern(weights.parameter("w"), 11));

  notify(sl::notice_kind::begin, 3);
  CHECK(wait_commit() == std::tuple{make_error_code(sl::errc::stale_version), 3u});
  sl::testing::check_text(weights.last_refusal(), "not after the committed version 5",
                          {"sender 0 began version 3"});

  notify(sl::notice_kind::commit, 3);  // its refused begin's commit: a stale notice, announces nothing
  update(6, 12);
  CHECK(wait_commit() == std::tuple{std::error_code{}, 6u});
  CHECK(holds_pattern(weights.parameter("w"), 12));
  CHECK(weights.committed_version() == 6u);
}

namespace {
/// A raw peer admitted as `sender`: its hello sent, the verdict, the arenas' header (their
/// descriptors closed) and the region table read; then it sends notices by hand.
struct raw_sender {
  raw_sender(asio::io_context& io, const std::string& path, accept_loop& accepts, std::uint32_t sender)
      : fd(raw_client(path)) {
    REQUIRE(fd >= 0);
    const std::size_t before = accepts.results.size();
    REQUIRE(raw_send(fd, sl::detail::encode_hello("SLSH", {sender, 0})));
    REQUIRE(run_until(io, [&] { return accepts.results.size() == before + 1; }));
    REQUIRE(accepts.results.back() == std::pair{std::error_code{}, sender});
    std::array<std::byte, sl::detail::verdict_bytes> verdict{};
    REQUIRE(::recv(fd, verdict.data(), verdict.size(), MSG_WAITALL) == 4);
    std::array<std::byte, sl::detail::shm_header_bytes> header{};
    std::vector<sl::detail::unique_fd> fds;
    bool truncated = false;
    std::error_code ec;
    REQUIRE(sl::detail::receive_with_fds(fd, header, fds, truncated, ec) == header.size());
    std::string payload(sl::detail::get_le<std::uint64_t>(header.data() + 8), '\0');
    REQUIRE(::recv(fd, payload.data(), payload.size(), MSG_WAITALL) == static_cast<ssize_t>(payload.size()));
  }
  ~raw_sender() { ::close(fd); }
  /// Sends one notice and reads its acknowledgement (the receiver holds it), driving `io`.
  void notify(asio::io_context& io, sl::notice_kind kind, std::uint32_t version) {
    const auto frame = sl::detail::encode_notice(kind, version);
    REQUIRE(raw_send(fd, frame));
    sl::detail::notice_frame ack{};
    std::size_t got = 0;
    REQUIRE(run_until(io, [&] {
      const ssize_t n = ::recv(fd, ack.data() + got, ack.size() - got, MSG_DONTWAIT);
      if (n > 0) got += static_cast<std::size_t>(n);
      return got == ack.size();
    }));
    CHECK(ack == frame);
  }
  int fd;
};
}  // namespace

TEST_CASE("shm hostile: through weights_receiver, a commit or abort of a version never begun is refused naming the "
          "sender, never announced; the legitimate sender then updates") {
  const auto path = socket_path("unbegun");
  asio::io_context io;
  sl::shm_transport::receiver endpoint(io.get_executor(), path);
  sl::weights_receiver<sl::shm_transport::receiver> weights(endpoint, {{"w", sl::dtype::bf16, {4096}}});
  accept_loop accepts(endpoint);
  auto wait_commit = [&] {
    outcome<std::error_code, std::uint32_t> got;
    weights.async_wait_commit(got.handler());
    REQUIRE(run_until(io, [&] { return got.ready(); }));
    return got.get();
  };
  bool abandons = false;  // the raw peer leaves in the middle of a version it began
  {
    raw_sender raw(io, path, accepts, 0);
    std::string says;
    std::uint32_t version = 0;
    SUBCASE("a commit never begun") {
      raw.notify(io, sl::notice_kind::commit, version = 1);
      says = "sender 0 committed version 1 without beginning it";
    }
    SUBCASE("a commit of another version than the one begun") {
      raw.notify(io, sl::notice_kind::begin, 1);
      raw.notify(io, sl::notice_kind::commit, version = 2);
      says = "sender 0 committed version 2 while in version 1";
      abandons = true;
    }
    SUBCASE("an abort never begun") {
      raw.notify(io, sl::notice_kind::abort, version = 1);
      says = "sender 0 aborted version 1 without beginning it";
    }
    CHECK(wait_commit() == std::tuple{make_error_code(sl::errc::protocol_error), version});
    sl::testing::check_text(weights.last_refusal(), says, {});
    CHECK_FALSE(weights.committed_version().has_value());
  }  // the raw peer hangs up

  sl::shm_transport t(io.get_executor());
  std::optional<connection> conn;
  REQUIRE(run_until(io, [&] {
    // Its id is free once the receiver read its end.
    auto [ec, c] = connect_once(io, t, path);
    if (c) conn = std::move(c);
    return conn.has_value();
  }));
  const auto* w = conn->remote_regions().find("w");
  REQUIRE(w);
  const auto source = patterned(w->length, 23);
  const sl::write_request write{source, 0, w->address, w->key};
  std::vector<std::error_code> codes;
  conn->async_notify(sl::notice_kind::begin, 1, [&](std::error_code e) { codes.push_back(e); });
  conn->async_write(std::span(&write, 1), [&](std::error_code e) { codes.push_back(e); });
  conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { codes.push_back(e); });
  if (abandons) {
    CHECK(wait_commit() == std::tuple{make_error_code(sl::errc::version_abandoned), 1u});
    sl::testing::check_text(weights.state().reason, "sender 0 disconnected while writing version 1", {});
  }
  CHECK(wait_commit() == std::tuple{std::error_code{}, 1u});
  REQUIRE(run_until(io, [&] { return codes.size() == 3; }));
  CHECK(codes == std::vector<std::error_code>(3));
  CHECK(holds_pattern(weights.parameter("w"), 23));
}
