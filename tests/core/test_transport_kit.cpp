// The transport kit (include/shardline/transport/detail/): the erased operation storage, the
// handshake with its deadline, its proof of a shared key (over TCP on 127.0.0.1), the control
// link of both sides and the expose() rule, each on its own, over sockets of this process.
#include <shardline/transport/detail/control_link.hpp>
#include <shardline/transport/detail/erased_op.hpp>
#include <shardline/transport/detail/expose.hpp>
#include <shardline/transport/detail/handshake.hpp>
#include <shardline/transport/detail/psk_auth.hpp>

#include "../support/checks.hpp"

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/read.hpp>
#include <asio/strand.hpp>
#include <asio/write.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace {

namespace sl = shardline;
namespace sd = shardline::detail;
using namespace std::chrono_literals;
using sl::testing::drive;
using socket_type = asio::local::stream_protocol::socket;
using acceptor_type = asio::local::stream_protocol::acceptor;

// ---- erased_op ------------------------------------------------------------------------

struct allocation_log {
  std::size_t allocated = 0;
  std::size_t freed = 0;
  std::size_t live() const { return allocated - freed; }
};

template <class T>
struct counting_allocator {
  using value_type = T;
  allocation_log* log;
  explicit counting_allocator(allocation_log* l) noexcept : log(l) {}
  template <class U>
  counting_allocator(const counting_allocator<U>& o) noexcept : log(o.log) {}
  T* allocate(std::size_t n) {
    ++log->allocated;
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    ++log->freed;
    std::allocator<T>().deallocate(p, n);
  }
  template <class U>
  bool operator==(const counting_allocator<U>& o) const noexcept {
    return log == o.log;
  }
};

// A handler that records, when it runs, how many blocks of its allocator are still live.
struct recording_handler {
  using allocator_type = counting_allocator<void>;
  allocation_log* log;
  std::optional<std::size_t>* live_at_upcall;
  std::optional<std::error_code>* result;
  allocator_type get_allocator() const noexcept { return allocator_type(log); }
  void operator()(std::error_code ec) {
    *live_at_upcall = log->live();
    *result = ec;
  }
};

struct payload_op : sd::erased_op<std::error_code> {
  using sd::erased_op<std::error_code>::erased_op;
  std::vector<int> state = std::vector<int>(100, 7);  // the transport's own fields live in the block too

protected:
  ~payload_op() = default;
};

TEST_CASE("erased_op: the block comes from the handler's allocator and is freed before the upcall, which runs later") {
  asio::io_context io;
  allocation_log log;
  std::optional<std::size_t> live_at_upcall;
  std::optional<std::error_code> result;
  auto op = sd::make_op<payload_op>(recording_handler{&log, &live_at_upcall, &result}, io.get_executor());
  CHECK(log.allocated == 1);
  CHECK(op->state.size() == 100);
  sd::complete_op(std::move(op), make_error_code(sl::errc::peer_disconnected));
  CHECK_FALSE(result.has_value());  // never inline
  CHECK(log.freed == 1);            // the op's block, freed at completion
  CHECK(log.allocated == 2);        // post()'s own, from the same allocator, until the upcall
  REQUIRE(drive(io, [&] { return result.has_value(); }));
  CHECK(*result == sl::errc::peer_disconnected);
  REQUIRE(live_at_upcall.has_value());
  CHECK(*live_at_upcall == 0);
}

TEST_CASE("erased_op: destroying a pending op drops its handler uncalled and returns its block") {
  asio::io_context io;
  allocation_log log;
  std::optional<std::size_t> live_at_upcall;
  std::optional<std::error_code> result;
  {
    auto op = sd::make_op<sd::erased_op<std::error_code>>(recording_handler{&log, &live_at_upcall, &result},
                                                          io.get_executor());
    CHECK(log.live() == 1);
  }
  CHECK(log.live() == 0);
  CHECK(log.allocated == 1);
  sl::testing::settle(io);
  CHECK_FALSE(result.has_value());
}

TEST_CASE("erased_op: the handler runs on its associated executor, and keeps it busy while pending") {
  asio::io_context io;
  auto strand = asio::make_strand(io);
  std::optional<bool> in_strand;
  auto op = sd::make_op<sd::erased_op<int>>(
      asio::bind_executor(strand, [&](int v) { in_strand = v == 5 && strand.running_in_this_thread(); }),
      io.get_executor());
  // The op's work guard keeps run() from returning while nothing else is queued.
  std::thread completer([&] {
    std::this_thread::sleep_for(20ms);
    asio::post(io, [&] { sd::complete_op(std::move(op), 5); });
  });
  io.run();  // returns only once the handler ran: the work was counted until then
  completer.join();
  REQUIRE(in_strand.has_value());
  CHECK(*in_strand);
}

// ---- handshake ----------------------------------------------------------------------

std::string socket_path(const char* name) {
  return "/tmp/shardline-kit-" + std::to_string(::getpid()) + "-" + name;
}

struct listener {
  listener(asio::io_context& io, std::string p) : path(std::move(p)), acceptor(io) {
    ::unlink(path.c_str());
    acceptor.open(asio::local::stream_protocol());
    acceptor.bind(asio::local::stream_protocol::endpoint(path));
    acceptor.listen();
  }
  ~listener() { ::unlink(path.c_str()); }
  std::string path;
  acceptor_type acceptor;
};

inline constexpr std::string_view magic = "SLKT";

// Receiver hooks for the tests: a fixed judgement, an exchange that writes "ok" and counts.
struct test_hooks {
  sd::judgement verdict;
  int* exchanges;
  int* judged;
  sd::judgement judge(const sl::sender_identity&) const {
    ++*judged;
    if (verdict.retry && *judged > 3) return {};  // the predecessor went
    return verdict;
  }
  template <class Socket, class Handler>
  void operator()(Socket& s, const sl::sender_identity&, Handler&& h) const {
    ++*exchanges;
    static const char ok[2] = {'o', 'k'};
    asio::async_write(s, asio::buffer(ok), std::forward<Handler>(h));
  }
};

// Sender exchange for the tests: reads the receiver's "ok".
struct read_ok {
  std::shared_ptr<std::array<char, 2>> got = std::make_shared<std::array<char, 2>>();
  template <class Socket, class Handler>
  void operator()(Socket& s, Handler&& h) const {
    asio::async_read(s, asio::buffer(*got), std::forward<Handler>(h));
  }
};

struct accept_result {
  std::optional<std::error_code> ec;
  sl::sender_identity who;
};

// A receiver's handshake under way on a fresh listener, with `verdict` as its judgement.
struct accepting {
  accepting(const char* name, sd::judgement verdict, std::chrono::milliseconds timeout = 2s)
      : l(io, socket_path(name)) {
    sd::async_handshake_as_receiver(l.acceptor, std::make_shared<socket_type>(io), magic, timeout,
                                    test_hooks{verdict, &exchanges, &judged},
                                    [this](std::error_code ec, sl::sender_identity who) {
                                      accepted.ec = ec;
                                      accepted.who = who;
                                    });
  }
  asio::local::stream_protocol::endpoint endpoint() const { return asio::local::stream_protocol::endpoint(l.path); }

  asio::io_context io;
  listener l;
  int exchanges = 0, judged = 0;
  accept_result accepted;
};

TEST_CASE("handshake: an admitted sender and its receiver both complete after the transport's exchange") {
  accepting f("admit", {});
  auto& [io, l, exchanges, judged, accepted] = f;
  auto client = std::make_shared<socket_type>(io);
  read_ok exchange;
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(client, asio::local::stream_protocol::endpoint(l.path), magic, {9, 0x1234}, 2s,
                                exchange, [&](std::error_code ec) { connected = ec; });
  REQUIRE(drive(io, [&] { return connected && accepted.ec; }));
  CHECK(*connected == std::error_code{});
  CHECK(*accepted.ec == std::error_code{});
  CHECK(accepted.who.sender == 9);
  CHECK(accepted.who.plan_fingerprint == 0x1234);
  CHECK(exchanges == 1);
  CHECK(std::string(exchange.got->data(), 2) == "ok");
  CHECK(client->is_open());
}

TEST_CASE("handshake: a refusal reaches the sender as its errc, the receiver's exchange never runs") {
  accepting f("refuse", {make_error_code(sl::errc::plan_mismatch)});
  auto& [io, l, exchanges, judged, accepted] = f;
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(std::make_shared<socket_type>(io), asio::local::stream_protocol::endpoint(l.path),
                                magic, {2, 0}, 2s, read_ok{}, [&](std::error_code ec) { connected = ec; });
  REQUIRE(drive(io, [&] { return connected && accepted.ec; }));
  CHECK(*connected == sl::errc::plan_mismatch);
  CHECK(connected->message() == "peers built from different plans");
  CHECK(*accepted.ec == sl::errc::plan_mismatch);
  CHECK(accepted.who.sender == 2);
  CHECK(exchanges == 0);
}

TEST_CASE("handshake: a judge that asks to retry is asked again, and admits once its predecessor is gone") {
  accepting f("retry", {make_error_code(sl::errc::invalid_argument), true});
  auto& [io, l, exchanges, judged, accepted] = f;
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(std::make_shared<socket_type>(io), asio::local::stream_protocol::endpoint(l.path),
                                magic, {3, 0}, 2s, read_ok{}, [&](std::error_code ec) { connected = ec; });
  REQUIRE(drive(io, [&] { return connected && accepted.ec; }));
  CHECK(judged == 4);
  CHECK(*accepted.ec == std::error_code{});
  CHECK(*connected == std::error_code{});
}

TEST_CASE("handshake: a silent sender runs into the receiver's deadline, timed_out, and is dropped") {
  accepting f("silent-sender", {}, 100ms);
  auto& [io, l, exchanges, judged, accepted] = f;
  socket_type mute(io);
  mute.connect(asio::local::stream_protocol::endpoint(l.path));
  REQUIRE(drive(io, [&] { return accepted.ec.has_value(); }));
  CHECK(*accepted.ec == asio::error::timed_out);
  CHECK(accepted.ec->message() == "Connection timed out");
  CHECK(judged == 0);
  char byte;
  std::error_code end;
  mute.read_some(asio::buffer(&byte, 1), end);  // dropped: end of file, no verdict
  CHECK(end == asio::error::eof);
}

TEST_CASE("handshake: a receiver that never answers runs into the sender's deadline, timed_out") {
  asio::io_context io;
  listener l(io, socket_path("silent-receiver"));
  socket_type taken(io);  // accepted, never answered
  l.acceptor.async_accept(taken, [](std::error_code) {});
  auto client = std::make_shared<socket_type>(io);
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(client, asio::local::stream_protocol::endpoint(l.path), magic, {1, 0}, 100ms,
                                read_ok{}, [&](std::error_code ec) { connected = ec; });
  REQUIRE(drive(io, [&] { return connected.has_value(); }));
  CHECK(*connected == asio::error::timed_out);
  CHECK(connected->message() == "Connection timed out");
  CHECK_FALSE(client->is_open());
}

TEST_CASE("handshake: a truncated or garbage hello is refused before anything else is read or written") {
  accepting f("garbage", {});
  auto& [io, l, exchanges, judged, accepted] = f;
  socket_type raw(io);
  raw.connect(asio::local::stream_protocol::endpoint(l.path));
  SUBCASE("truncated: the peer leaves after 10 bytes") {
    const std::array<char, 10> part{'S', 'L', 'K', 'T'};
    asio::write(raw, asio::buffer(part));
    raw.shutdown(asio::socket_base::shutdown_send);
    REQUIRE(drive(io, [&] { return accepted.ec.has_value(); }));
    CHECK(*accepted.ec == sl::errc::peer_disconnected);
    CHECK(accepted.ec->message() == "peer disconnected");
  }
  SUBCASE("garbage: another magic gets a protocol_error verdict, then end of file") {
    auto hello = sd::encode_hello("XXXX", {5, 0});
    asio::write(raw, asio::buffer(hello));
    REQUIRE(drive(io, [&] { return accepted.ec.has_value(); }));
    CHECK(*accepted.ec == sl::errc::protocol_error);
    CHECK(accepted.who.sender == 0);  // a hello that did not parse names nobody
    sd::verdict_frame verdict{};
    asio::read(raw, asio::buffer(verdict));
    CHECK(sd::decode_verdict(verdict) == sl::errc::protocol_error);
    char byte;
    std::error_code end;
    raw.read_some(asio::buffer(&byte, 1), end);
    CHECK(end == asio::error::eof);
  }
  SUBCASE("another protocol version") {
    auto hello = sd::encode_hello(magic, {5, 0});
    hello[4] = std::byte{99};
    asio::write(raw, asio::buffer(hello));
    REQUIRE(drive(io, [&] { return accepted.ec.has_value(); }));
    CHECK(*accepted.ec == sl::errc::protocol_version_mismatch);
  }
  CHECK(judged == 0);
  CHECK(exchanges == 0);
}

TEST_CASE("handshake: any cancellation type ends it with operation_aborted and closes the socket") {
  asio::io_context io;
  listener l(io, socket_path("cancel"));
  socket_type taken(io);
  l.acceptor.async_accept(taken, [](std::error_code) {});
  auto client = std::make_shared<socket_type>(io);
  asio::cancellation_signal signal;
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(client, asio::local::stream_protocol::endpoint(l.path), magic, {1, 0}, 10s,
                                read_ok{},
                                asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) { connected = ec; }));
  REQUIRE(drive(io, [&] { return taken.is_open(); }));
  sl::testing::settle(io);  // the hello went out; the verdict read is pending
  signal.emit(asio::cancellation_type::partial);
  REQUIRE(drive(io, [&] { return connected.has_value(); }));
  CHECK(*connected == asio::error::operation_aborted);
  CHECK_FALSE(client->is_open());
}

// ---- handshake_listener: concurrent handshakes -------------------------------------------

// A receiver built from the kit alone: a Unix listener, its handshake_listener, and the
// results its async_accept would report, in order.
struct kit_receiver : std::enable_shared_from_this<kit_receiver> {
  using handshakes_type = sd::handshake_listener<asio::any_io_executor, socket_type>;
  struct pending {
    explicit pending(asio::io_context& io) : socket(io) {}
    socket_type socket;
  };
  kit_receiver(asio::io_context& c, const char* name, std::size_t limit, std::chrono::steady_clock::duration t)
      : io(c), l(c, socket_path(name)), timeout(t),
        handshakes(std::make_shared<handshakes_type>(c.get_executor(), limit)) {}

  asio::io_context& io;
  listener l;
  std::chrono::steady_clock::duration timeout;
  std::shared_ptr<handshakes_type> handshakes;
  int exchanges = 0, judged = 0;
  std::vector<std::shared_ptr<pending>> admitted;
  std::vector<std::shared_ptr<pending>> made;  // every socket accepted into, or waiting to be

  struct driver {
    std::weak_ptr<kit_receiver> r;
    std::shared_ptr<kit_receiver> lock() const { return r.lock(); }
    handshakes_type& listener(kit_receiver& k) const { return *k.handshakes; }
    acceptor_type& acceptor(kit_receiver& k) const { return k.l.acceptor; }
    std::shared_ptr<pending> make_pending(kit_receiver& k) const {
      return k.made.emplace_back(std::make_shared<pending>(k.io));
    }
    template <class Done>
    void handshake(kit_receiver& k, std::shared_ptr<pending> p, Done done) const {
      sd::async_handshake_accepted(std::shared_ptr<socket_type>(p, &p->socket), magic, k.timeout,
                                   test_hooks{{}, &k.exchanges, &k.judged}, std::move(done));
    }
    std::error_code admit(kit_receiver& k, const std::shared_ptr<pending>& p, std::error_code ec,
                          sl::sender_identity) const {
      if (!ec) k.admitted.push_back(p);
      return ec;
    }
  };

  // What the transport's async_accept does: take the next result, keep the listener accepting.
  template <class Handler>
  void async_accept(Handler h) {
    handshakes->take(std::move(h));
    sd::accept_peers(driver{weak_from_this()});
  }
};

struct taken_result {
  std::optional<std::error_code> ec;
  std::uint32_t sender = 0;
  auto handler() {
    return [this](std::error_code e, std::uint32_t s) {
      ec = e;
      sender = s;
    };
  }
};

TEST_CASE("handshake_listener: a silent peer holds only its own handshake; a sender behind it is admitted first") {
  asio::io_context io;
  // An hour: if the silent peer held the listener, drive()'s hang guard would fail the test.
  auto r = std::make_shared<kit_receiver>(io, "silent-first", 16, std::chrono::hours(1));
  taken_result first;
  r->async_accept(first.handler());
  socket_type mute(io);
  mute.connect(asio::local::stream_protocol::endpoint(r->l.path));
  REQUIRE(drive(io, [&] { return r->handshakes->running() == 1; }));  // the silent peer's handshake runs
  auto client = std::make_shared<socket_type>(io);
  read_ok exchange;
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(client, asio::local::stream_protocol::endpoint(r->l.path), magic, {5, 0}, 1h,
                                exchange, [&](std::error_code ec) { connected = ec; });
  REQUIRE(drive(io, [&] { return connected && first.ec; }));
  CHECK(*connected == std::error_code{});
  CHECK(*first.ec == std::error_code{});
  CHECK(first.sender == 5);
  CHECK(std::string(exchange.got->data(), 2) == "ok");
  CHECK(r->admitted.size() == 1);
  CHECK(r->handshakes->running() == 1);  // the silent one, still within its deadline

  // close() drops it: end of file, no verdict; a pending take ends with operation_aborted.
  taken_result second;
  r->async_accept(second.handler());
  sl::testing::settle(io);
  CHECK_FALSE(second.ec.has_value());
  r->handshakes->close();
  REQUIRE(drive(io, [&] { return second.ec.has_value(); }));
  CHECK(*second.ec == asio::error::operation_aborted);
  char byte;
  std::error_code end;
  mute.read_some(asio::buffer(&byte, 1), end);
  CHECK(end == asio::error::eof);
}

TEST_CASE("handshake_listener: past max pending handshakes it accepts nothing until a result is taken") {
  asio::io_context io;
  auto r = std::make_shared<kit_receiver>(io, "limit", 2, std::chrono::hours(1));
  taken_result first;
  r->async_accept(first.handler());
  socket_type mute1(io), mute2(io);
  mute1.connect(asio::local::stream_protocol::endpoint(r->l.path));
  mute2.connect(asio::local::stream_protocol::endpoint(r->l.path));
  REQUIRE(drive(io, [&] { return r->handshakes->running() == 2; }));
  CHECK_FALSE(r->handshakes->may_accept());
  // A sender beyond the limit waits in the backlog: nobody reads its hello.
  auto client = std::make_shared<socket_type>(io);
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(client, asio::local::stream_protocol::endpoint(r->l.path), magic, {7, 0}, 1h,
                                read_ok{}, [&](std::error_code ec) { connected = ec; });
  sl::testing::settle(io);
  CHECK_FALSE(connected.has_value());
  CHECK(r->judged == 0);
  // One silent peer leaves: its result goes to the pending take, which makes room.
  mute1.close();
  REQUIRE(drive(io, [&] { return first.ec.has_value(); }));
  CHECK(*first.ec == sl::errc::peer_disconnected);
  REQUIRE(drive(io, [&] { return connected.has_value(); }));
  CHECK(*connected == std::error_code{});
  // Its result waits for the next take, in the order the handshakes ended.
  taken_result second;
  r->async_accept(second.handler());
  REQUIRE(drive(io, [&] { return second.ec.has_value(); }));
  CHECK(*second.ec == std::error_code{});
  CHECK(second.sender == 7);
  r->handshakes->close();
}

TEST_CASE("handshake_listener: a cancelled take loses no result; two handshakes cannot claim one id") {
  asio::io_context io;
  auto r = std::make_shared<kit_receiver>(io, "cancel-take", 4, std::chrono::hours(1));
  asio::cancellation_signal signal;
  taken_result cancelled;
  r->async_accept(asio::bind_cancellation_slot(signal.slot(), cancelled.handler()));
  sl::testing::settle(io);
  signal.emit(asio::cancellation_type::terminal);
  REQUIRE(drive(io, [&] { return cancelled.ec.has_value(); }));
  CHECK(*cancelled.ec == asio::error::operation_aborted);
  // The listener kept accepting: a sender's handshake completes, its result kept.
  auto client = std::make_shared<socket_type>(io);
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(client, asio::local::stream_protocol::endpoint(r->l.path), magic, {3, 0}, 1h,
                                read_ok{}, [&](std::error_code ec) { connected = ec; });
  REQUIRE(drive(io, [&] { return connected.has_value(); }));
  CHECK(*connected == std::error_code{});
  taken_result later;
  r->async_accept(later.handler());
  REQUIRE(drive(io, [&] { return later.ec.has_value(); }));
  CHECK(*later.ec == std::error_code{});
  CHECK(later.sender == 3);

  // Two peers in mid-handshake: the first to claim sender 9 has it until its handshake ends.
  const std::size_t before = r->made.size();
  socket_type a(io);
  a.connect(asio::local::stream_protocol::endpoint(r->l.path));
  REQUIRE(drive(io, [&] { return r->handshakes->running() == 1; }));
  socket_type b(io);
  b.connect(asio::local::stream_protocol::endpoint(r->l.path));
  REQUIRE(drive(io, [&] { return r->handshakes->running() == 2; }));
  REQUIRE(r->made.size() >= before + 2);
  const socket_type* of_a = &r->made[before - 1]->socket;  // accepted into the socket made last before
  const socket_type* of_b = &r->made[before]->socket;
  CHECK(r->handshakes->claim(of_a, 9));
  CHECK_FALSE(r->handshakes->claim(of_b, 9));
  CHECK(r->handshakes->claim(of_b, 10));
  taken_result gone;
  r->async_accept(gone.handler());
  a.close();
  REQUIRE(drive(io, [&] { return gone.ec.has_value(); }));
  CHECK(*gone.ec == sl::errc::peer_disconnected);
  CHECK(r->handshakes->claim(of_b, 9));  // a's handshake ended: 9 is free
  r->handshakes->close();
}

// ---- shared key -----------------------------------------------------------------------

std::vector<std::byte> key_bytes(unsigned char first) {
  std::vector<std::byte> b(sl::shared_key::size);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(first + i);
  return b;
}

const sl::shared_key& test_key() {
  static const sl::shared_key k = sl::shared_key::from_bytes(key_bytes(1));
  return k;
}

const sl::shared_key& other_key() {
  static const sl::shared_key k = sl::shared_key::from_bytes(key_bytes(2));
  return k;
}

// A file of this test's with `mode`, holding `text`.
struct key_file {
  key_file(const char* name, const std::string& text, mode_t mode) : path(socket_path(name)) {
    std::ofstream(path, std::ios::binary) << text;
    ::chmod(path.c_str(), mode);
  }
  ~key_file() { ::unlink(path.c_str()); }
  std::string path;
};

TEST_CASE("shared_key: loaded from bytes, hex, a 0600 file (hex or raw) and the environment, all the same key") {
  const std::string hex = test_key().hex();
  CHECK(hex.size() == 64);
  CHECK(hex.substr(0, 8) == "01020304");
  const auto same = [&](const sl::shared_key& k) {
    return std::memcmp(k.secret().data(), test_key().secret().data(), sl::shared_key::size) == 0;
  };
  CHECK(same(sl::shared_key::from_hex(" " + hex + "\n")));
  key_file hex_file("key-hex", hex + "\n", 0600);
  CHECK(same(sl::shared_key::from_file(hex_file.path)));
  const auto raw = key_bytes(1);
  key_file raw_file("key-raw", std::string(reinterpret_cast<const char*>(raw.data()), raw.size()), 0400);
  CHECK(same(sl::shared_key::from_file(raw_file.path)));
  ::setenv("SHARDLINE_KIT_TEST_KEY", hex.c_str(), 1);
  CHECK(same(sl::shared_key::from_environment("SHARDLINE_KIT_TEST_KEY")));
  ::unsetenv("SHARDLINE_KIT_TEST_KEY");
  const auto fresh = sl::shared_key::generate();
  CHECK_FALSE(same(fresh));
  CHECK(fresh.hex() != sl::shared_key::generate().hex());
}

TEST_CASE("shared_key: every malformed key is refused, naming its source and never its text") {
  using sl::testing::check_throws;
  check_throws([] { (void)sl::shared_key::from_bytes(std::vector<std::byte>(31)); }, sl::errc::invalid_argument,
               {"shared key: 31 bytes given; a key is exactly 32 bytes"});
  const std::string secretish = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeZ";  // one digit is not
  const auto no_leak = [&](auto f, std::initializer_list<std::string_view> names) {
    try {
      f();
      FAIL("no error thrown");
    } catch (const sl::error& e) {
      CHECK(e.code() == sl::errc::invalid_argument);
      sl::testing::check_text(e.what(), e.code().message(), names);
      CHECK(std::string(e.what()).find("0123456789abcdef") == std::string::npos);
    }
  };
  no_leak([&] { (void)sl::shared_key::from_hex(secretish); },
          {"shared key is not a key: a key is 64 hexadecimal digits (32 bytes)"});
  no_leak([&] { (void)sl::shared_key::from_hex(secretish.substr(0, 62)); }, {"shared key is not a key"});
  ::setenv("SHARDLINE_KIT_TEST_KEY", secretish.c_str(), 1);
  no_leak([] { (void)sl::shared_key::from_environment("SHARDLINE_KIT_TEST_KEY"); },
          {"shared key: environment variable SHARDLINE_KIT_TEST_KEY is not a key"});
  ::unsetenv("SHARDLINE_KIT_TEST_KEY");
  check_throws([] { (void)sl::shared_key::from_environment("SHARDLINE_KIT_TEST_KEY"); }, sl::errc::invalid_argument,
               {"shared key: environment variable SHARDLINE_KIT_TEST_KEY is not set"});
  key_file loose("key-loose", test_key().hex(), 0644);
  no_leak([&] { (void)sl::shared_key::from_file(loose.path); },
          {"shared key file '" + loose.path + "' may be read by others (mode 0644): make it 0600"});
  key_file junk("key-junk", secretish + "\n", 0600);
  no_leak([&] { (void)sl::shared_key::from_file(junk.path); }, {"shared key file '" + junk.path + "' is not a key"});
  key_file too_long("key-long", test_key().hex() + test_key().hex(), 0600);
  no_leak([&] { (void)sl::shared_key::from_file(too_long.path); }, {"is not a key"});
  const std::string missing = socket_path("key-missing");
  try {
    (void)sl::shared_key::from_file(missing);
    FAIL("a missing file should not load");
  } catch (const sl::error& e) {
    CHECK(e.code() == std::errc::no_such_file_or_directory);
    sl::testing::check_text(e.what(), e.code().message(), {"shared key file '" + missing + "' cannot be opened"});
  }
}

// A receiver's handshakes, one after another, on one TCP listener of 127.0.0.1.
struct tcp_listener {
  using tcp = asio::ip::tcp;
  explicit tcp_listener(std::optional<sl::shared_key> k, std::chrono::milliseconds timeout = 2s)
      : acceptor(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)), key(std::move(k)), timeout(timeout) {}

  // Starts one handshake; its result lands in `accepted`.
  void accept() {
    accepted = {};
    sd::async_handshake_as_receiver(acceptor, std::make_shared<tcp::socket>(io), magic, timeout, key,
                                    test_hooks{{}, &exchanges, &judged}, [this](std::error_code ec, sl::sender_identity who) {
                                      accepted.ec = ec;
                                      accepted.who = who;
                                    });
  }

  // A sender's handshake with `k`; its result.
  std::error_code connect(std::optional<sl::shared_key> k, sl::sender_identity who = {4, 0x44}) {
    std::optional<std::error_code> connected;
    sd::async_handshake_as_sender(std::make_shared<tcp::socket>(io), acceptor.local_endpoint(), magic, who, timeout, k,
                                  read_ok{}, [&](std::error_code ec) { connected = ec; });
    REQUIRE(drive(io, [&] { return connected && accepted.ec; }));
    return *connected;
  }

  asio::io_context io;
  tcp::acceptor acceptor;
  std::optional<sl::shared_key> key;
  std::chrono::milliseconds timeout;
  int exchanges = 0, judged = 0;
  accept_result accepted;
};

// A raw TCP peer of a test: reads exactly n bytes, or everything up to the end.
struct raw_peer {
  explicit raw_peer(asio::io_context& io) : io(io), s(io) {}
  std::string read(std::size_t n) {
    std::string b(n, '\0');
    std::optional<std::error_code> done;
    asio::async_read(s, asio::buffer(b), [&](std::error_code ec, std::size_t) { done = ec; });
    REQUIRE(drive(io, [&] { return done.has_value(); }));
    REQUIRE_FALSE(*done);
    return b;
  }
  // Everything until the other side closes.
  std::string rest() {
    std::string got;
    std::array<char, 256> chunk{};
    std::optional<std::error_code> end;
    std::function<void()> more = [&] {
      s.async_read_some(asio::buffer(chunk), [&](std::error_code ec, std::size_t n) {
        got.append(chunk.data(), n);
        if (ec) end = ec;
        else more();
      });
    };
    more();
    REQUIRE(drive(io, [&] { return end.has_value(); }));
    // A side that closes with bytes of ours unread resets the connection instead.
    CHECK((*end == asio::error::eof || *end == asio::error::connection_reset));
    return got;
  }
  void write(const std::string& b) { asio::write(s, asio::buffer(b)); }
  template <std::size_t N>
  void write(const std::array<std::byte, N>& b) {
    asio::write(s, asio::buffer(b));
  }
  asio::io_context& io;
  asio::ip::tcp::socket s;
};

inline const std::string_view authentication_failed = "authentication failed: the peers do not hold the same key";

TEST_CASE("key proof: a sender holding the receiver's key is admitted, over TCP") {
  tcp_listener l(test_key());
  l.accept();
  CHECK(l.connect(test_key(), {4, 0x44}) == std::error_code{});
  CHECK(*l.accepted.ec == std::error_code{});
  CHECK(l.accepted.who.sender == 4);
  CHECK(l.accepted.who.plan_fingerprint == 0x44);
  CHECK(l.judged == 1);
  CHECK(l.exchanges == 1);
}

TEST_CASE("key proof: another key fails both sides with authentication_failed, before judge, verdict and exchange") {
  tcp_listener l(test_key());
  l.accept();
  const auto connected = l.connect(other_key());
  CHECK(connected == sl::errc::authentication_failed);
  CHECK(connected.message() == authentication_failed);
  CHECK(*l.accepted.ec == sl::errc::authentication_failed);
  CHECK(l.accepted.ec->message() == authentication_failed);
  CHECK(l.accepted.who.sender == 0);  // an unproven hello names nobody
  CHECK(l.judged == 0);
  CHECK(l.exchanges == 0);
  // The receiver accepts on; the right key is admitted.
  l.accept();
  CHECK(l.connect(test_key()) == std::error_code{});
  CHECK(*l.accepted.ec == std::error_code{});
}

TEST_CASE("key proof: a key on one side only fails the keyed side's peer, and the keyed sender sends nothing past its hello") {
  SUBCASE("keyless sender, keyed receiver: the sender is told") {
    tcp_listener l(test_key(), 300ms);
    l.accept();
    const auto connected = l.connect(std::nullopt);
    CHECK(connected == sl::errc::authentication_failed);
    CHECK(*l.accepted.ec == sl::errc::peer_disconnected);  // it left instead of proving
    CHECK(l.judged == 0);
  }
  SUBCASE("keyed sender, keyless receiver: the sender refuses the verdict and leaves") {
    tcp_listener l(std::nullopt);
    l.accept();
    const auto connected = l.connect(test_key());
    CHECK(connected == sl::errc::authentication_failed);
    CHECK(connected.message() == authentication_failed);
    // (The keyless receiver judged it and may have finished its exchange before the sender
    // left: what it saw depends on timing, what the sender sent does not.)
    CHECK(l.judged == 1);
  }
}

TEST_CASE("key proof: a client that says hello but cannot prove the key receives the challenge and nothing else") {
  tcp_listener l(test_key(), 300ms);
  l.accept();
  raw_peer c(l.io);
  c.s.connect(l.acceptor.local_endpoint());
  c.write(sd::encode_hello(magic, {1, 0}));
  const std::string challenge = c.read(sd::psk_challenge_bytes);
  CHECK(challenge.substr(0, 4) == "SLAU");
  SUBCASE("it then says nothing: the deadline drops it, without another byte") {
    CHECK(c.rest().empty());
    CHECK(*l.accepted.ec == asio::error::timed_out);
  }
  SUBCASE("it then sends a proof's worth of garbage: a failed status without a MAC, then the end") {
    c.write(std::string(sd::psk_proof_bytes, 'x'));
    const std::string answer = c.rest();
    REQUIRE(answer.size() == sd::psk_answer_bytes);
    CHECK(sd::get_le<std::uint32_t>(answer.data()) == static_cast<std::uint32_t>(sl::errc::authentication_failed));
    CHECK(answer.substr(4) == std::string(sd::psk_mac_bytes, '\0'));
    CHECK(*l.accepted.ec == sl::errc::authentication_failed);
  }
  SUBCASE("it then sends half a proof and leaves") {
    c.write(std::string(sd::psk_proof_bytes / 2, 'x'));
    c.s.shutdown(asio::socket_base::shutdown_send);
    CHECK(c.rest().empty());
    CHECK(*l.accepted.ec == sl::errc::peer_disconnected);
  }
  SUBCASE("garbage instead of a hello gets the same challenge, and no verdict") {
    // (the hello above was a good one; a second connection sends noise)
    c.s.close();
    REQUIRE(drive(l.io, [&] { return l.accepted.ec.has_value(); }));
    l.accept();
    raw_peer g(l.io);
    g.s.connect(l.acceptor.local_endpoint());
    g.write(std::string(sd::hello_bytes + sd::psk_proof_bytes, 'z'));
    const std::string got = g.rest();
    REQUIRE(got.size() == sd::psk_challenge_bytes + sd::psk_answer_bytes);
    CHECK(got.substr(0, 4) == "SLAU");
    CHECK(*l.accepted.ec == sl::errc::authentication_failed);
  }
  CHECK(l.judged == 0);
  CHECK(l.exchanges == 0);
  l.accept();
  CHECK(l.connect(test_key()) == std::error_code{});  // served on
}

// What a client holding the key proves for the challenge it read: the proof frame's bytes.
std::string forge_proof(const std::string& challenge, const sd::hello_frame& hello, sd::psk_role role,
                        unsigned char nonce_byte) {
  sd::psk_session s(test_key());
  std::memcpy(s.challenge.data(), challenge.data(), s.challenge.size());
  std::array<std::byte, sd::psk_nonce_bytes> nonce{};
  nonce.fill(static_cast<std::byte>(nonce_byte));
  const auto mac = s.mac(role, magic, hello, nonce.data());
  return std::string(reinterpret_cast<const char*>(nonce.data()), nonce.size()) +
         std::string(reinterpret_cast<const char*>(mac.data()), mac.size());
}

TEST_CASE("key proof: a proof replayed from another connection, or the receiver's MAC reflected as the sender's, fails") {
  tcp_listener l(test_key());
  const auto hello = sd::encode_hello(magic, {3, 0});
  // A client with the key, by hand: admitted (the forgery below is the real thing).
  l.accept();
  std::string recorded;
  {
    raw_peer c(l.io);
    c.s.connect(l.acceptor.local_endpoint());
    c.write(hello);
    recorded = forge_proof(c.read(sd::psk_challenge_bytes), hello, sd::psk_role::sender, 7);
    c.write(recorded);
    const std::string answer = c.read(sd::psk_answer_bytes);
    CHECK(sd::get_le<std::uint32_t>(answer.data()) == 0);
    REQUIRE(drive(l.io, [&] { return l.accepted.ec.has_value(); }));
    CHECK(*l.accepted.ec == std::error_code{});
    CHECK(l.accepted.who.sender == 3);
  }
  SUBCASE("the recorded proof, replayed against a fresh challenge") {
    l.accept();
    raw_peer c(l.io);
    c.s.connect(l.acceptor.local_endpoint());
    c.write(hello);
    (void)c.read(sd::psk_challenge_bytes);
    c.write(recorded);
    CHECK(c.rest().size() == sd::psk_answer_bytes);
    CHECK(*l.accepted.ec == sl::errc::authentication_failed);
  }
  SUBCASE("the receiver's own MAC for this very connection, sent as the sender's") {
    l.accept();
    raw_peer c(l.io);
    c.s.connect(l.acceptor.local_endpoint());
    c.write(hello);
    c.write(forge_proof(c.read(sd::psk_challenge_bytes), hello, sd::psk_role::receiver, 8));
    CHECK(c.rest().size() == sd::psk_answer_bytes);
    CHECK(*l.accepted.ec == sl::errc::authentication_failed);
  }
  SUBCASE("a proof for another hello (another sender id) than the one sent") {
    l.accept();
    raw_peer c(l.io);
    c.s.connect(l.acceptor.local_endpoint());
    c.write(hello);
    c.write(forge_proof(c.read(sd::psk_challenge_bytes), sd::encode_hello(magic, {4, 0}), sd::psk_role::sender, 9));
    CHECK(c.rest().size() == sd::psk_answer_bytes);
    CHECK(*l.accepted.ec == sl::errc::authentication_failed);
  }
  CHECK(l.judged == 1);
}

// A receiver played by hand against a keyed sender: reads its hello, sends a challenge, and
// answers its proof with `answer(proof)`.
template <class Answer>
std::error_code fake_receiver(std::chrono::milliseconds timeout, Answer answer, bool silent_after_challenge = false) {
  asio::io_context io;
  asio::ip::tcp::acceptor a(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  raw_peer r(io);
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(std::make_shared<asio::ip::tcp::socket>(io), a.local_endpoint(), magic, {1, 0}, timeout,
                                std::optional<sl::shared_key>(test_key()), read_ok{},
                                [&](std::error_code ec) { connected = ec; });
  a.accept(r.s);
  const std::string hello = r.read(sd::hello_bytes);
  std::string challenge = "SLAU" + std::string(sd::psk_nonce_bytes, '\x5a');
  r.write(challenge);
  if (!silent_after_challenge) r.write(answer(r.read(sd::psk_proof_bytes)));
  REQUIRE(drive(io, [&] { return connected.has_value(); }));
  return *connected;
}

TEST_CASE("key proof: a receiver that reflects the sender's MAC, answers garbage or goes silent fails the sender") {
  const auto status = [](std::uint32_t v) {
    std::string s;
    sd::put_le<std::uint32_t>(s, v);
    return s;
  };
  SUBCASE("the sender's own MAC, reflected with an admitted status") {
    const auto ec = fake_receiver(2s, [&](const std::string& proof) { return status(0) + proof.substr(sd::psk_nonce_bytes); });
    CHECK(ec == sl::errc::authentication_failed);
    CHECK(ec.message() == authentication_failed);
  }
  SUBCASE("a status that is neither admitted nor failed") {
    const auto ec = fake_receiver(2s, [&](const std::string&) { return status(77) + std::string(32, '\0'); });
    CHECK(ec == sl::errc::protocol_error);
  }
  SUBCASE("the answer cut short") {
    const auto ec = fake_receiver(2s, [&](const std::string&) { return status(0); });
    CHECK(ec == asio::error::timed_out);
  }
  SUBCASE("nothing after the challenge: the deadline") {
    const auto ec = fake_receiver(200ms, [&](const std::string&) { return std::string(); }, true);
    CHECK(ec == asio::error::timed_out);
  }
}

TEST_CASE("key proof: a first frame that is neither a challenge nor a verdict is a protocol_error") {
  asio::io_context io;
  asio::ip::tcp::acceptor a(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  raw_peer r(io);
  std::optional<std::error_code> connected;
  sd::async_handshake_as_sender(std::make_shared<asio::ip::tcp::socket>(io), a.local_endpoint(), magic, {1, 0}, 2s,
                                std::optional<sl::shared_key>(test_key()), read_ok{},
                                [&](std::error_code ec) { connected = ec; });
  a.accept(r.s);
  (void)r.read(sd::hello_bytes);
  r.write(std::string("XXXX") + std::string(sd::psk_nonce_bytes, '\0'));
  REQUIRE(drive(io, [&] { return connected.has_value(); }));
  CHECK(*connected == sl::errc::protocol_error);
  CHECK(r.rest().empty());  // no proof went out
}

// ---- control link -------------------------------------------------------------------

struct link_listener {
  explicit link_listener(socket_type s) : link(std::move(s)) {}
  sd::notice_link<socket_type, link_listener> link;
  std::vector<std::uint64_t> acked;
  std::optional<std::error_code> ended;
  void notice_acknowledged(std::uint64_t tag) { acked.push_back(tag); }
  void control_ended(std::error_code why) {
    CHECK_FALSE(ended.has_value());  // once
    ended = why;
  }
};

struct link_pair {
  explicit link_pair(asio::io_context& io) : receiver_end(io) {
    socket_type sender_end(io);
    asio::local::connect_pair(sender_end, receiver_end);
    sender = std::make_shared<link_listener>(std::move(sender_end));
    sender->link.watch(sender);
  }
  socket_type receiver_end;
  std::shared_ptr<link_listener> sender;
};

TEST_CASE("notice_link: frames go out in order and their echoes acknowledge them by tag") {
  asio::io_context io;
  link_pair p(io);
  const auto begin = sd::encode_notice(sl::notice_kind::begin, 4);
  const auto commit = sd::encode_notice(sl::notice_kind::commit, 4);
  p.sender->link.send(begin, 11);
  p.sender->link.send(commit, 12);
  std::array<sd::notice_frame, 2> got{};
  std::optional<std::error_code> read;
  asio::async_read(p.receiver_end, asio::buffer(got), [&](std::error_code ec, std::size_t) { read = ec; });
  REQUIRE(drive(io, [&] { return read.has_value(); }));
  CHECK(got[0] == begin);
  CHECK(got[1] == commit);
  asio::write(p.receiver_end, asio::buffer(got));
  REQUIRE(drive(io, [&] { return p.sender->acked.size() == 2; }));
  CHECK(p.sender->acked == std::vector<std::uint64_t>{11, 12});
  CHECK_FALSE(p.sender->ended.has_value());
  CHECK(p.sender->link.is_open());
}

TEST_CASE("notice_link: the receiver's end fails the link once with peer_disconnected; pending notices get no ack") {
  asio::io_context io;
  link_pair p(io);
  p.sender->link.send(sd::encode_notice(sl::notice_kind::commit, 1), 1);
  p.receiver_end.close();
  REQUIRE(drive(io, [&] { return p.sender->ended.has_value(); }));
  CHECK(*p.sender->ended == sl::errc::peer_disconnected);
  CHECK(p.sender->ended->message() == "peer disconnected");
  CHECK(p.sender->acked.empty());
  CHECK_FALSE(p.sender->link.is_open());
}

TEST_CASE("notice_link: an echo that is not the oldest frame's, or one nobody waits for, is a protocol_error") {
  asio::io_context io;
  link_pair p(io);
  SUBCASE("another frame") {
    p.sender->link.send(sd::encode_notice(sl::notice_kind::commit, 1), 1);
    asio::write(p.receiver_end, asio::buffer(sd::encode_notice(sl::notice_kind::commit, 2)));
  }
  SUBCASE("nothing was sent") { asio::write(p.receiver_end, asio::buffer(sd::encode_notice(sl::notice_kind::begin, 1))); }
  REQUIRE(drive(io, [&] { return p.sender->ended.has_value(); }));
  CHECK(*p.sender->ended == sl::errc::protocol_error);
  CHECK(p.sender->acked.empty());
}

TEST_CASE("notice_link: close() ends it without a report") {
  asio::io_context io;
  link_pair p(io);
  p.sender->link.close();
  sl::testing::settle(io);
  CHECK_FALSE(p.sender->ended.has_value());
  CHECK_FALSE(p.sender->link.is_open());
}

struct test_peer : sd::notice_source<socket_type> {
  using sd::notice_source<socket_type>::notice_source;
};

struct inbox_listener : std::enable_shared_from_this<inbox_listener> {
  std::vector<sl::notice> got;
  std::optional<std::error_code> left;
  bool hold = false;  // true: acknowledge later
  bool serving(const test_peer&) const { return !left; }
  bool notice_arrived(const std::shared_ptr<test_peer>&, sl::notice n) {
    got.push_back(n);
    return !hold;
  }
  void sender_left(const std::shared_ptr<test_peer>&, std::error_code why) { left = why; }
};

TEST_CASE("serve_notices: each notice is handed over, then echoed; a held one is echoed when acknowledged") {
  asio::io_context io;
  socket_type sender_end(io), receiver_end(io);
  asio::local::connect_pair(sender_end, receiver_end);
  auto peer = std::make_shared<test_peer>(std::move(receiver_end));
  peer->sender = 6;
  auto l = std::make_shared<inbox_listener>();
  sd::serve_notices(std::weak_ptr<inbox_listener>(l), peer);
  sd::notice_frame echo{};
  std::optional<std::error_code> echoed;
  auto await_echo = [&] {
    echoed.reset();
    asio::async_read(sender_end, asio::buffer(echo), [&](std::error_code ec, std::size_t) { echoed = ec; });
  };
  const auto begin = sd::encode_notice(sl::notice_kind::begin, 2);
  asio::write(sender_end, asio::buffer(begin));
  await_echo();
  REQUIRE(drive(io, [&] { return echoed.has_value(); }));
  CHECK(echo == begin);
  REQUIRE(l->got.size() == 1);
  CHECK(l->got[0] == sl::notice{6, sl::notice_kind::begin, 2});

  l->hold = true;
  const auto commit = sd::encode_notice(sl::notice_kind::commit, 2);
  asio::write(sender_end, asio::buffer(commit));
  await_echo();
  REQUIRE(drive(io, [&] { return l->got.size() == 2; }));
  sl::testing::settle(io);
  CHECK_FALSE(echoed.has_value());  // held: no echo yet
  sd::acknowledge_notice(std::weak_ptr<inbox_listener>(l), peer);
  REQUIRE(drive(io, [&] { return echoed.has_value(); }));
  CHECK(echo == commit);
  CHECK(l->got[1] == sl::notice{6, sl::notice_kind::commit, 2});
  CHECK_FALSE(l->left.has_value());
}

TEST_CASE("serve_notices: garbage is protocol_error, end of file peer_disconnected, each reported once") {
  asio::io_context io;
  socket_type sender_end(io), receiver_end(io);
  asio::local::connect_pair(sender_end, receiver_end);
  auto peer = std::make_shared<test_peer>(std::move(receiver_end));
  auto l = std::make_shared<inbox_listener>();
  sd::serve_notices(std::weak_ptr<inbox_listener>(l), peer);
  SUBCASE("garbage") {
    const sd::notice_frame bad{std::byte{0x77}};
    asio::write(sender_end, asio::buffer(bad));
    REQUIRE(drive(io, [&] { return l->left.has_value(); }));
    CHECK(*l->left == sl::errc::protocol_error);
  }
  SUBCASE("end of file") {
    sender_end.close();
    REQUIRE(drive(io, [&] { return l->left.has_value(); }));
    CHECK(*l->left == sl::errc::peer_disconnected);
  }
  CHECK(l->got.empty());
}

TEST_CASE("probe_predecessor: a live socket is alive, one whose peer left is gone, or leaving while bytes are unread") {
  asio::io_context io;
  socket_type a(io), b(io);
  asio::local::connect_pair(a, b);
  CHECK(sd::probe_predecessor(a.native_handle()) == sd::predecessor::alive);
  SUBCASE("the peer left, nothing unread") {
    b.close();
    CHECK(sd::probe_predecessor(a.native_handle()) == sd::predecessor::gone);
  }
  SUBCASE("the peer left after a notice nobody read yet") {
    asio::write(b, asio::buffer(sd::encode_notice(sl::notice_kind::commit, 1)));
    b.close();
    CHECK(sd::probe_predecessor(a.native_handle()) == sd::predecessor::leaving);
    sd::notice_frame unread{};
    asio::read(a, asio::buffer(unread));  // the probe consumed nothing
    CHECK(unread == sd::encode_notice(sl::notice_kind::commit, 1));
    CHECK(sd::probe_predecessor(a.native_handle()) == sd::predecessor::gone);
  }
}

// ---- expose ---------------------------------------------------------------------------

TEST_CASE("expose_region: kind, then the transport's key, then name and overlap; each refusal names receiver and region once") {
  sl::region_table table;
  std::vector<std::byte> bytes(256);
  const sd::exposer who{"kit receiver", "the kit transport", sl::memory_kinds{sl::memory_kind::host}};
  int keyed = 0;
  auto key = [&](const sl::exposure&) {
    ++keyed;
    return 7u;
  };
  sd::expose_region(table, {"a", std::span(bytes).first(100), {}, {}}, who, key);
  REQUIRE(table.find("a"));
  CHECK(table.find("a")->key == 7);
  sl::testing::check_throws(
      [&] { sd::expose_region(table, {"gpu", std::span(bytes), sl::memory_location::cuda(0), {}}, who, key); },
      sl::errc::unsupported_memory, {"kit receiver: region 'gpu'", "the kit transport", "cuda_device:0"});
  CHECK(keyed == 1);  // the kind is checked before the transport registers anything
  sl::testing::check_throws([&] { sd::expose_region(table, {"a", std::span(bytes).subspan(100), {}, {}}, who, key); },
                            sl::errc::invalid_argument, {"kit receiver: region 'a' is exposed twice"});
  sl::testing::check_throws([&] { sd::expose_region(table, {"b", std::span(bytes).subspan(50, 100), {}, {}}, who, key); },
                            sl::errc::invalid_argument, {"kit receiver: region 'b'", "overlaps region 'a'"});
  sl::testing::check_throws(
      [&] {
        sd::expose_region(table, {"c", std::span(bytes).subspan(200), {}, {}}, who, [&](const sl::exposure& e) -> std::uint32_t {
          throw sl::error(make_error_code(sl::errc::unsupported_memory), who.region(e.name) + " is not ours");
        });
      },
      sl::errc::unsupported_memory, {"kit receiver: region 'c' is not ours"});
  CHECK(table.size() == 1);
}


// ---- sealed control link (keyed network transports) -----------------------------------

sd::session_key session_key_of(unsigned char fill) {
  std::array<unsigned char, sd::session_key::size> b{};
  b.fill(fill);
  return sd::session_key(b);
}

// A frame as a keyed peer puts it on the wire: the frame, then the first 16 bytes of its MAC.
std::string sealed(const sd::notice_frame& f, unsigned char key_fill, sd::seal_direction way, std::uint64_t seq) {
  const auto mac = sd::notice_seal::tag(session_key_of(key_fill), way, seq, f);
  std::string s(reinterpret_cast<const char*>(f.data()), f.size());
  s.append(reinterpret_cast<const char*>(mac.data()), sd::seal_tag_bytes);
  return s;
}

struct sealed_peer : sd::notice_source<socket_type, sd::notice_seal> {
  using sd::notice_source<socket_type, sd::notice_seal>::notice_source;
};

struct sealed_inbox : std::enable_shared_from_this<sealed_inbox> {
  std::vector<sl::notice> got;
  std::optional<std::error_code> left;
  bool serving(const sealed_peer&) const { return !left; }
  bool notice_arrived(const std::shared_ptr<sealed_peer>&, sl::notice n) {
    got.push_back(n);
    return true;
  }
  void sender_left(const std::shared_ptr<sealed_peer>&, std::error_code why) {
    CHECK_FALSE(left.has_value());  // once
    left = why;
  }
};

struct sealed_link_listener {
  explicit sealed_link_listener(socket_type s) : link(std::move(s)) {}
  sd::notice_link<socket_type, sealed_link_listener, sd::notice_seal> link;
  std::vector<std::uint64_t> acked;
  std::optional<std::error_code> ended;
  void notice_acknowledged(std::uint64_t tag) { acked.push_back(tag); }
  void control_ended(std::error_code why) {
    CHECK_FALSE(ended.has_value());  // once
    ended = why;
  }
};

// A sender's sealed link under session key `fill`, its other end left raw.
struct sealed_sender {
  explicit sealed_sender(asio::io_context& io, unsigned char fill = 7) : io(io), raw(io) {
    socket_type end(io);
    asio::local::connect_pair(end, raw);
    l = std::make_shared<sealed_link_listener>(std::move(end));
    l->link.seal() = sd::notice_seal(session_key_of(fill), sd::seal_direction::notice);
    l->link.watch(l);
  }
  std::string read(std::size_t n) {
    std::string b(n, '\0');
    std::optional<std::error_code> done;
    asio::async_read(raw, asio::buffer(b), [&](std::error_code ec, std::size_t) { done = ec; });
    REQUIRE(drive(io, [&] { return done.has_value(); }));
    REQUIRE_FALSE(*done);
    return b;
  }
  asio::io_context& io;
  socket_type raw;
  std::shared_ptr<sealed_link_listener> l;
};

// A receiver's sealed peer under session key `fill`, served; the sender's end left raw.
struct sealed_receiver {
  explicit sealed_receiver(asio::io_context& io, unsigned char fill = 7) : io(io), raw(io) {
    socket_type end(io);
    asio::local::connect_pair(raw, end);
    peer = std::make_shared<sealed_peer>(std::move(end));
    peer->sender = 3;
    peer->seal = sd::notice_seal(session_key_of(fill), sd::seal_direction::ack);
    sd::serve_notices(std::weak_ptr<sealed_inbox>(inbox), peer);
  }
  std::string read(std::size_t n) {
    std::string b(n, '\0');
    std::optional<std::error_code> done;
    asio::async_read(raw, asio::buffer(b), [&](std::error_code ec, std::size_t) { done = ec; });
    REQUIRE(drive(io, [&] { return done.has_value(); }));
    REQUIRE_FALSE(*done);
    return b;
  }
  asio::io_context& io;
  socket_type raw;
  std::shared_ptr<sealed_peer> peer;
  std::shared_ptr<sealed_inbox> inbox = std::make_shared<sealed_inbox>();
};

TEST_CASE("notice seal: notices go out as frame and 16-byte tag, numbered per direction; sealed acks acknowledge them") {
  asio::io_context io;
  sealed_sender s(io);
  const auto begin = sd::encode_notice(sl::notice_kind::begin, 4);
  const auto commit = sd::encode_notice(sl::notice_kind::commit, 4);
  s.l->link.send(begin, 11);
  s.l->link.send(commit, 12);
  CHECK(s.read(2 * (sd::notice_bytes + sd::seal_tag_bytes)) ==
        sealed(begin, 7, sd::seal_direction::notice, 0) + sealed(commit, 7, sd::seal_direction::notice, 1));
  asio::write(s.raw, asio::buffer(sealed(begin, 7, sd::seal_direction::ack, 0) +
                                  sealed(commit, 7, sd::seal_direction::ack, 1)));
  REQUIRE(drive(io, [&] { return s.l->acked.size() == 2; }));
  CHECK(s.l->acked == std::vector<std::uint64_t>{11, 12});
  CHECK_FALSE(s.l->ended.has_value());
  CHECK(s.l->link.is_open());
}

TEST_CASE("notice seal: a sealed link and a sealed peer under one session key deliver begin and commit, both acked") {
  asio::io_context io;
  socket_type a(io), b(io);
  asio::local::connect_pair(a, b);
  auto sender = std::make_shared<sealed_link_listener>(std::move(a));
  sender->link.seal() = sd::notice_seal(session_key_of(9), sd::seal_direction::notice);
  sender->link.watch(sender);
  auto peer = std::make_shared<sealed_peer>(std::move(b));
  peer->sender = 5;
  peer->seal = sd::notice_seal(session_key_of(9), sd::seal_direction::ack);
  auto inbox = std::make_shared<sealed_inbox>();
  sd::serve_notices(std::weak_ptr<sealed_inbox>(inbox), peer);
  for (std::uint32_t v = 1; v <= 3; ++v) {
    sender->link.send(sd::encode_notice(sl::notice_kind::begin, v), 2 * v);
    sender->link.send(sd::encode_notice(sl::notice_kind::commit, v), 2 * v + 1);
  }
  REQUIRE(drive(io, [&] { return sender->acked.size() == 6; }));
  CHECK(sender->acked == std::vector<std::uint64_t>{2, 3, 4, 5, 6, 7});
  REQUIRE(inbox->got.size() == 6);
  CHECK(inbox->got[4] == sl::notice{5, sl::notice_kind::begin, 3});
  CHECK(inbox->got[5] == sl::notice{5, sl::notice_kind::commit, 3});
  CHECK_FALSE(inbox->left.has_value());
  CHECK_FALSE(sender->ended.has_value());
}

TEST_CASE("notice seal: a tampered, bare, replayed, reordered or foreign-keyed notice is authentication_failed and never delivered") {
  asio::io_context io;
  sealed_receiver r(io);
  const auto begin = sd::encode_notice(sl::notice_kind::begin, 8);
  const auto commit = sd::encode_notice(sl::notice_kind::commit, 8);
  std::size_t delivered = 0;
  SUBCASE("one bit of the frame flipped") {
    auto bytes = sealed(commit, 7, sd::seal_direction::notice, 0);
    bytes[4] = static_cast<char>(bytes[4] ^ 0x01);  // version 8 -> 9
    asio::write(r.raw, asio::buffer(bytes));
  }
  SUBCASE("one bit of the tag flipped") {
    auto bytes = sealed(commit, 7, sd::seal_direction::notice, 0);
    bytes[sd::notice_bytes + 15] = static_cast<char>(bytes[sd::notice_bytes + 15] ^ 0x80);
    asio::write(r.raw, asio::buffer(bytes));
  }
  SUBCASE("bare frames, as an unkeyed peer sends them") {
    for (int i = 0; i < 3; ++i) asio::write(r.raw, asio::buffer(commit));
  }
  SUBCASE("sealed under another session key") {
    asio::write(r.raw, asio::buffer(sealed(commit, 8, sd::seal_direction::notice, 0)));
  }
  SUBCASE("an ack's seal (the other direction)") {
    asio::write(r.raw, asio::buffer(sealed(commit, 7, sd::seal_direction::ack, 0)));
  }
  SUBCASE("the second frame before the first") {
    asio::write(r.raw, asio::buffer(sealed(commit, 7, sd::seal_direction::notice, 1)));
  }
  SUBCASE("a good frame, then the same sealed bytes again") {
    const auto bytes = sealed(begin, 7, sd::seal_direction::notice, 0);
    asio::write(r.raw, asio::buffer(bytes));
    CHECK(r.read(sd::notice_bytes + sd::seal_tag_bytes) == sealed(begin, 7, sd::seal_direction::ack, 0));
    asio::write(r.raw, asio::buffer(bytes));
    delivered = 1;
  }
  REQUIRE(drive(io, [&] { return r.inbox->left.has_value(); }));
  CHECK(*r.inbox->left == sl::errc::authentication_failed);
  CHECK(r.inbox->left->message() == authentication_failed);
  REQUIRE(r.inbox->got.size() == delivered);
  if (delivered) CHECK(r.inbox->got[0] == sl::notice{3, sl::notice_kind::begin, 8});
}

TEST_CASE("notice seal: a forged, replayed or reflected ack fails the sender with authentication_failed") {
  asio::io_context io;
  sealed_sender s(io);
  const auto commit = sd::encode_notice(sl::notice_kind::commit, 2);
  s.l->link.send(commit, 1);
  const auto sent = s.read(sd::notice_bytes + sd::seal_tag_bytes);
  std::vector<std::uint64_t> acked;
  SUBCASE("the echo with a zeroed tag") {
    asio::write(s.raw, asio::buffer(std::string(reinterpret_cast<const char*>(commit.data()), commit.size()) +
                                    std::string(sd::seal_tag_bytes, '\0')));
  }
  SUBCASE("the notice's own sealed bytes echoed") { asio::write(s.raw, asio::buffer(sent)); }
  SUBCASE("sealed under another session key") {
    asio::write(s.raw, asio::buffer(sealed(commit, 8, sd::seal_direction::ack, 0)));
  }
  SUBCASE("one bit of the ack's tag flipped") {
    auto bytes = sealed(commit, 7, sd::seal_direction::ack, 0);
    bytes[sd::notice_bytes] = static_cast<char>(bytes[sd::notice_bytes] ^ 0x04);
    asio::write(s.raw, asio::buffer(bytes));
  }
  SUBCASE("a good ack replayed for the same notice sent again") {
    const auto ack = sealed(commit, 7, sd::seal_direction::ack, 0);
    asio::write(s.raw, asio::buffer(ack));
    REQUIRE(drive(io, [&] { return s.l->acked.size() == 1; }));
    s.l->link.send(commit, 2);
    CHECK(s.read(sd::notice_bytes + sd::seal_tag_bytes) == sealed(commit, 7, sd::seal_direction::notice, 1));
    asio::write(s.raw, asio::buffer(ack));
    acked = {1};
  }
  REQUIRE(drive(io, [&] { return s.l->ended.has_value(); }));
  CHECK(*s.l->ended == sl::errc::authentication_failed);
  CHECK(s.l->ended->message() == authentication_failed);
  CHECK(s.l->acked == acked);
  CHECK_FALSE(s.l->link.is_open());
}

TEST_CASE("notice seal: unkeyed, frames go bare as with no_seal") {
  asio::io_context io;
  socket_type a(io), raw(io);
  asio::local::connect_pair(a, raw);
  auto l = std::make_shared<sealed_link_listener>(std::move(a));
  l->link.watch(l);
  const auto begin = sd::encode_notice(sl::notice_kind::begin, 1);
  l->link.send(begin, 4);
  sd::notice_frame got{};
  asio::read(raw, asio::buffer(got));
  CHECK(got == begin);
  asio::write(raw, asio::buffer(begin));
  REQUIRE(drive(io, [&] { return l->acked.size() == 1; }));
  CHECK(l->acked == std::vector<std::uint64_t>{4});
  CHECK_FALSE(l->ended.has_value());
}

// Keyed handshake hooks that keep the session key they are handed.
using kept_key = std::shared_ptr<std::optional<sd::session_key>>;
struct keeping_hooks {
  kept_key kept;
  sd::judgement judge(const sl::sender_identity&) const { return {}; }
  void authenticated(sd::session_key k) const { kept->emplace(std::move(k)); }
  template <class Socket, class Handler>
  void operator()(Socket& s, const sl::sender_identity&, Handler&& h) const {
    static const char ok[2] = {'o', 'k'};
    asio::async_write(s, asio::buffer(ok), std::forward<Handler>(h));
  }
};
struct keeping_exchange : read_ok {
  kept_key kept;
  void authenticated(sd::session_key k) const { kept->emplace(std::move(k)); }
};

bool same_key(const sd::session_key& a, const sd::session_key& b) {
  return sodium_memcmp(a.secret().data(), b.secret().data(), sd::session_key::size) == 0;
}

TEST_CASE("notice seal: both ends of a keyed handshake are handed the same session key, another on each connection") {
  using tcp = asio::ip::tcp;
  asio::io_context io;
  tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  std::vector<std::pair<kept_key, kept_key>> keys;
  for (int i = 0; i < 2; ++i) {
    kept_key r = std::make_shared<std::optional<sd::session_key>>(), s = std::make_shared<std::optional<sd::session_key>>();
    std::optional<std::error_code> accepted, connected;
    sd::async_handshake_as_receiver(acceptor, std::make_shared<tcp::socket>(io), magic, 2s,
                                    std::optional<sl::shared_key>(test_key()), keeping_hooks{r},
                                    [&](std::error_code ec, sl::sender_identity) { accepted = ec; });
    keeping_exchange x;
    x.kept = s;
    sd::async_handshake_as_sender(std::make_shared<tcp::socket>(io), acceptor.local_endpoint(), magic, {1, 0}, 2s,
                                  std::optional<sl::shared_key>(test_key()), x,
                                  [&](std::error_code ec) { connected = ec; });
    REQUIRE(drive(io, [&] { return accepted && connected; }));
    CHECK(*accepted == std::error_code{});
    CHECK(*connected == std::error_code{});
    REQUIRE(r->has_value());
    REQUIRE(s->has_value());
    CHECK(same_key(**r, **s));
    keys.emplace_back(r, s);
  }
  CHECK_FALSE(same_key(**keys[0].first, **keys[1].first));

  // Keyless, nobody is handed a key.
  kept_key r = std::make_shared<std::optional<sd::session_key>>(), s = std::make_shared<std::optional<sd::session_key>>();
  std::optional<std::error_code> accepted, connected;
  sd::async_handshake_as_receiver(acceptor, std::make_shared<tcp::socket>(io), magic, 2s,
                                  std::optional<sl::shared_key>(), keeping_hooks{r},
                                  [&](std::error_code ec, sl::sender_identity) { accepted = ec; });
  keeping_exchange x;
  x.kept = s;
  sd::async_handshake_as_sender(std::make_shared<tcp::socket>(io), acceptor.local_endpoint(), magic, {1, 0}, 2s,
                                std::optional<sl::shared_key>(), x, [&](std::error_code ec) { connected = ec; });
  REQUIRE(drive(io, [&] { return accepted && connected; }));
  CHECK(*accepted == std::error_code{});
  CHECK(*connected == std::error_code{});
  CHECK_FALSE(r->has_value());
  CHECK_FALSE(s->has_value());
}

}  // namespace
