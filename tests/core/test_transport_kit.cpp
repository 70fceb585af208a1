// The transport kit (include/shardline/transport/detail/): the erased operation storage, the
// handshake with its deadline, the control link of both sides and the expose() rule, each
// on its own, over Unix sockets of this process.
#include <shardline/transport/detail/control_link.hpp>
#include <shardline/transport/detail/erased_op.hpp>
#include <shardline/transport/detail/expose.hpp>
#include <shardline/transport/detail/handshake.hpp>

#include "../support/checks.hpp"

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/io_context.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/read.hpp>
#include <asio/strand.hpp>
#include <asio/write.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

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
  template <class Handler>
  void operator()(socket_type& s, const sl::sender_identity&, Handler&& h) const {
    ++*exchanges;
    static const char ok[2] = {'o', 'k'};
    asio::async_write(s, asio::buffer(ok), std::forward<Handler>(h));
  }
};

// Sender exchange for the tests: reads the receiver's "ok".
struct read_ok {
  std::shared_ptr<std::array<char, 2>> got = std::make_shared<std::array<char, 2>>();
  template <class Handler>
  void operator()(socket_type& s, Handler&& h) const {
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

}  // namespace
