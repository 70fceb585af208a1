// The verbs transport's control side, in the Soft-RoCE VM (tests/rxe/run): admission and
// refusals, acknowledged notices from several senders, senders that leave and come back,
// clients that speak garbage, and memory the receiver adopts instead of allocating.
#include <shardline/transport/verbs/transport.hpp>

#include "verbs_support.hpp"

#include "../support/checks.hpp"

#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/detail/psk_auth.hpp>
#include <shardline/transport/verbs/detail/wire.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/read.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <asio/write.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <future>
#include <memory>
#include <optional>
#include <stdexcept>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

using namespace verbs_test;
namespace sd = shardline::detail;

namespace {

// Notices the receiver delivered, in order, with their codes.
struct notice_log {
  std::vector<std::pair<std::error_code, sl::notice>> got;
  void wait(sv::verbs_transport::receiver& r) {
    r.async_wait_notification([this](std::error_code ec, sl::notice n) { got.emplace_back(ec, n); });
  }
};

// Writes `w` then notices `kind` of `version`; true when both succeeded.
bool write_and_notify(asio::io_context& io, sv::verbs_transport::connection& c, const sl::write_request& w,
                      sl::notice_kind kind, std::uint32_t version) {
  std::optional<std::error_code> wrote, notified;
  c.async_write(std::span(&w, 1), [&](std::error_code ec) { wrote = ec; });
  c.async_notify(kind, version, [&](std::error_code ec) { notified = ec; });
  REQUIRE(run_until(io, [&] { return wrote && notified; }));
  CHECK_FALSE(*wrote);
  CHECK_FALSE(*notified);
  return !*wrote && !*notified;
}

}  // namespace

TEST_CASE("verbs control: async_notify completes only once the receiver acknowledged it; unawaited notices queue in order") {
  if (!have_device()) return;
  // Sender and receiver on separate io_contexts: the receiver acknowledges only while its
  // context runs.
  asio::io_context sender_io, receiver_io;
  sv::verbs_transport ts(sender_io.get_executor(), keyed());
  sv::verbs_transport tr(receiver_io.get_executor(), keyed());
  sv::verbs_transport::receiver r(tr, listen_endpoint());
  r.expose("model", r.allocate(4096));
  auto h = connect(sender_io, receiver_io, ts, r, {5, 0});
  REQUIRE_FALSE(h.accept_ec);
  REQUIRE_FALSE(h.connect_ec);
  CHECK(h.sender == 5);
  auto& c = *h.conn;

  std::optional<std::error_code> first;
  c.async_notify(sl::notice_kind::begin, 1, [&](std::error_code ec) { first = ec; });
  sender_io.restart();
  sender_io.run_for(300ms);  // the frame is sent; nobody acknowledges it yet
  CHECK_FALSE(first.has_value());
  REQUIRE(run_until({&sender_io, &receiver_io}, [&] { return first.has_value(); }));
  CHECK_FALSE(*first);

  // Nobody waited: the notice was queued, then acknowledged. Four more, unawaited.
  std::vector<std::error_code> acks;
  c.async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { acks.push_back(ec); });
  c.async_notify(sl::notice_kind::begin, 2, [&](std::error_code ec) { acks.push_back(ec); });
  c.async_notify(sl::notice_kind::abort, 2, [&](std::error_code ec) { acks.push_back(ec); });
  c.async_notify(sl::notice_kind::withdraw, 3, [&](std::error_code ec) { acks.push_back(ec); });
  REQUIRE(run_until({&sender_io, &receiver_io}, [&] { return acks.size() == 4; }));
  for (auto& ec : acks) CHECK_FALSE(ec);
  notice_log log;
  for (int i = 0; i < 5; ++i) log.wait(r);
  REQUIRE(run_until(receiver_io, [&] { return log.got.size() == 5; }));
  const std::vector<sl::notice> expected{{5, sl::notice_kind::begin, 1},
                                         {5, sl::notice_kind::commit, 1},
                                         {5, sl::notice_kind::begin, 2},
                                         {5, sl::notice_kind::abort, 2},
                                         {5, sl::notice_kind::withdraw, 3}};
  for (std::size_t i = 0; i < 5; ++i) {
    CAPTURE(i);
    CHECK_FALSE(log.got[i].first);
    CHECK(log.got[i].second == expected[i]);
  }
}

TEST_CASE("verbs control: with notice_depth 0 a notice is acknowledged only when a wait takes it, and a queued one holds its sender's next") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint(), 0);
  r.expose("model", r.allocate(4096));
  auto h = connect(io, t, r, {1, 0});
  REQUIRE_FALSE(h.connect_ec);
  std::optional<std::error_code> first, second;
  h.conn->async_notify(sl::notice_kind::begin, 1, [&](std::error_code ec) { first = ec; });
  h.conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { second = ec; });
  io.restart();
  io.run_for(300ms);  // both sides run; nobody waits
  CHECK_FALSE(first.has_value());
  CHECK_FALSE(second.has_value());
  notice_log log;
  log.wait(r);
  REQUIRE(run_until(io, [&] { return first.has_value(); }));
  CHECK_FALSE(*first);
  REQUIRE(log.got.size() == 1);
  CHECK(log.got[0].second == sl::notice{1, sl::notice_kind::begin, 1});
  io.restart();
  io.run_for(300ms);
  CHECK_FALSE(second.has_value());  // the next waits for the next wait
  log.wait(r);
  REQUIRE(run_until(io, [&] { return second.has_value() && log.got.size() == 2; }));
  CHECK_FALSE(*second);
  CHECK(log.got[1].second == sl::notice{1, sl::notice_kind::commit, 1});
}

TEST_CASE("verbs control: two senders to one receiver, notices named by sender; one leaves, the other is served on") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  r.admit({2, 0});
  auto arena = r.allocate(2 * 4096);
  r.expose("rank0", arena.subspan(0, 4096));
  r.expose("rank1", arena.subspan(4096, 4096));
  std::vector<std::byte> staging(2 * 4096);
  fill(staging, 11);
  auto reg = t.register_memory(staging);
  auto a = connect(io, t, r, {0, 0});
  auto b = connect(io, t, r, {1, 0});
  REQUIRE_FALSE(a.connect_ec);
  REQUIRE_FALSE(b.connect_ec);
  CHECK(a.sender == 0);
  CHECK(b.sender == 1);
  const auto wa = sl::make_write(reg.region(), std::span(staging).subspan(0, 4096),
                                 *a.conn->remote_regions().find("rank0"));
  const auto wb = sl::make_write(reg.region(), std::span(staging).subspan(4096, 4096),
                                 *b.conn->remote_regions().find("rank1"));
  notice_log log;
  for (int i = 0; i < 2; ++i) log.wait(r);
  CHECK(write_and_notify(io, *b.conn, wb, sl::notice_kind::commit, 20));
  CHECK(write_and_notify(io, *a.conn, wa, sl::notice_kind::commit, 10));
  REQUIRE(run_until(io, [&] { return log.got.size() == 2; }));
  CHECK(log.got[0].second == sl::notice{1, sl::notice_kind::commit, 20});
  CHECK(log.got[1].second == sl::notice{0, sl::notice_kind::commit, 10});
  CHECK(same(staging, arena));

  // Sender 0 leaves: the receiver learns it by name and keeps serving sender 1.
  a.conn->close();
  CHECK_FALSE(a.conn->is_open());
  log.wait(r);
  REQUIRE(run_until(io, [&] { return log.got.size() == 3; }));
  CHECK(log.got[2].first == sl::errc::peer_disconnected);
  CHECK(log.got[2].second == sl::notice{0, sl::notice_kind::abort, 0});
  fill(staging, 12);
  log.wait(r);
  CHECK(write_and_notify(io, *b.conn, wb, sl::notice_kind::commit, 21));
  REQUIRE(run_until(io, [&] { return log.got.size() == 4; }));
  CHECK_FALSE(log.got[3].first);
  CHECK(log.got[3].second == sl::notice{1, sl::notice_kind::commit, 21});
  CHECK(same(std::span(staging).subspan(4096), arena.subspan(4096)));
  // The closed connection fails at once.
  auto late = a.conn->async_notify(sl::notice_kind::begin, 1, asio::use_future);
  REQUIRE(run_until(io, [&] { return late.wait_for(0s) == std::future_status::ready; }));
  CHECK_THROWS_AS(late.get(), std::system_error);
}

TEST_CASE("verbs control: a second live connection with the same id is refused; after it leaves, it reconnects") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("model", arena);
  std::vector<std::byte> staging(4096);
  auto reg = t.register_memory(staging);
  auto first = connect(io, t, r, {3, 0});
  REQUIRE_FALSE(first.connect_ec);

  auto twin = connect(io, t, r, {3, 0});
  CHECK(twin.connect_ec == sl::errc::invalid_argument);
  CHECK(twin.accept_ec == sl::errc::invalid_argument);
  CHECK(twin.sender == 3);
  CHECK_FALSE(twin.conn.has_value());
  CHECK(first.conn->is_open());

  // Closed and reconnected at once: the receiver reads the old connection to its end first.
  first.conn->close();
  auto again = connect(io, t, r, {3, 0});
  REQUIRE_FALSE(again.accept_ec);
  REQUIRE_FALSE(again.connect_ec);
  notice_log log;
  log.wait(r);
  log.wait(r);
  fill(staging, 13);
  CHECK(write_and_notify(io, *again.conn, sl::make_write(reg.region(), staging, again.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 2));
  REQUIRE(run_until(io, [&] { return log.got.size() == 2; }));
  CHECK(log.got[0].first == sl::errc::peer_disconnected);
  CHECK(log.got[0].second == sl::notice{3, sl::notice_kind::abort, 0});
  CHECK_FALSE(log.got[1].first);
  CHECK(log.got[1].second == sl::notice{3, sl::notice_kind::commit, 2});
  CHECK(same(staging, arena));
}

TEST_CASE("verbs control: refused senders learn why and see no region; the admitted one is served") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("model", arena);
  r.admit({2, 0xabc});
  std::vector<std::byte> staging(4096);
  fill(staging, 14);
  auto reg = t.register_memory(staging);

  auto other_plan = connect(io, t, r, {1, 0xdef});
  CHECK(other_plan.connect_ec == sl::errc::plan_mismatch);
  CHECK(other_plan.accept_ec == sl::errc::plan_mismatch);
  CHECK(other_plan.sender == 1);
  CHECK_FALSE(other_plan.conn.has_value());

  auto stranger = connect(io, t, r, {2, 0xabc});
  CHECK(stranger.connect_ec == sl::errc::unknown_sender);
  CHECK(stranger.accept_ec == sl::errc::unknown_sender);
  CHECK(stranger.sender == 2);

  // A hello of another protocol version, by hand, from a peer that proves the key: refused
  // with that reason (a peer that does not prove it is told nothing).
  {
    asio::ip::tcp::socket s(io);
    s.connect(r.local_endpoint());
    std::string text = "SLVB";
    sd::put_le<std::uint32_t>(text, sd::control_protocol + 1);
    sd::put_le<std::uint32_t>(text, 1);
    sd::put_le<std::uint64_t>(text, 0xabc);
    sd::hello_frame hello{};
    std::memcpy(hello.data(), text.data(), hello.size());
    std::optional<std::error_code> accepted;
    r.async_accept([&](std::error_code ec, std::uint32_t) { accepted = ec; });
    asio::write(s, asio::buffer(hello));
    auto proof = std::make_unique<sd::psk_session>(test_key());
    std::optional<std::error_code> challenged;
    asio::async_read(s, asio::buffer(proof->challenge), [&](std::error_code ec, std::size_t) { challenged = ec; });
    REQUIRE(run_until(io, [&] { return challenged.has_value(); }));
    REQUIRE_FALSE(*challenged);
    proof->make_proof(sv::detail::hello_magic, hello);
    asio::write(s, asio::buffer(proof->proof));
    struct {
      std::array<std::byte, sd::psk_answer_bytes> answer{};
      std::array<std::byte, sd::verdict_bytes> verdict{};
    } reply;
    auto& verdict = reply.verdict;
    std::optional<std::error_code> read;
    asio::async_read(s, std::array{asio::buffer(reply.answer), asio::buffer(reply.verdict)},
                     [&](std::error_code ec, std::size_t) { read = ec; });
    REQUIRE(run_until(io, [&] { return accepted && read; }));
    CHECK(*accepted == sl::errc::protocol_version_mismatch);
    REQUIRE_FALSE(*read);
    proof->answer = reply.answer;
    CHECK_FALSE(proof->check_answer(sv::detail::hello_magic, hello));
    CHECK(sd::decode_verdict(verdict) == sl::errc::protocol_version_mismatch);
  }

  auto legit = connect(io, t, r, {1, 0xabc});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  CHECK(legit.sender == 1);
  notice_log log;
  log.wait(r);
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 1));
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(log.got[0].second == sl::notice{1, sl::notice_kind::commit, 1});
  CHECK(same(staging, arena));
}

namespace {
// A TCP client that sends `bytes` and reads whatever comes back until the receiver closes.
struct raw_client {
  raw_client(asio::io_context& io, asio::ip::tcp::endpoint ep, std::string bytes) : s(io), out(std::move(bytes)) {
    s.connect(ep);
    if (!out.empty()) asio::write(s, asio::buffer(out));
    read_more();
  }
  void read_more() {
    s.async_read_some(asio::buffer(chunk), [this](std::error_code ec, std::size_t n) {
      got.append(chunk.data(), n);
      if (ec) end = ec;
      else read_more();
    });
  }
  asio::ip::tcp::socket s;
  std::string out;
  std::array<char, 4096> chunk{};
  std::string got;
  std::optional<std::error_code> end;
};
}  // namespace

TEST_CASE("verbs control: clients that send garbage or nothing get no region table, and the receiver serves on") {
  if (!have_device()) return;
  asio::io_context io;
  sv::options o;
  o.connect_timeout = 1000ms;  // bounds the silent client's handshake
  sv::verbs_transport t(io.get_executor(), keyed(o));
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("secret.weights", arena);
  std::mt19937 random(20261128);
  const auto noise = [&](std::size_t n) {
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(random());
    s[0] = 'x';  // never the magic by chance
    return s;
  };

  SUBCASE("a hello's worth of random bytes: the challenge, then the deadline (no proof came)") {
    std::optional<std::error_code> accepted;
    r.async_accept([&](std::error_code ec, std::uint32_t) { accepted = ec; });
    raw_client c(io, r.local_endpoint(), noise(sd::hello_bytes));
    REQUIRE(run_until(io, [&] { return accepted && c.end; }));
    CHECK(*accepted == asio::error::timed_out);
    REQUIRE(c.got.size() == sd::psk_challenge_bytes);
    CHECK(c.got.substr(0, 4) == "SLAU");
  }
  SUBCASE("64 KiB of random bytes: nothing but a challenge and a failed status comes back") {
    std::optional<std::error_code> accepted;
    r.async_accept([&](std::error_code ec, std::uint32_t) { accepted = ec; });
    raw_client c(io, r.local_endpoint(), noise(64 << 10));
    REQUIRE(run_until(io, [&] { return accepted && c.end; }));
    CHECK(*accepted == sl::errc::authentication_failed);
    // (The receiver closes with the rest unread: the reset may cut what it sent short.)
    CHECK(c.got.size() <= sd::psk_challenge_bytes + sd::psk_answer_bytes);
    CHECK(c.got.find("secret.weights") == std::string::npos);
  }
  SUBCASE("a client that says nothing: its handshake times out") {
    std::optional<std::error_code> accepted;
    r.async_accept([&](std::error_code ec, std::uint32_t) { accepted = ec; });
    raw_client c(io, r.local_endpoint(), "");
    REQUIRE(run_until(io, [&] { return accepted && c.end; }));
    CHECK(*accepted == asio::error::timed_out);
    CHECK(c.got.empty());
  }
  // Then a real sender is served.
  std::vector<std::byte> staging(4096);
  fill(staging, 15);
  auto reg = t.register_memory(staging);
  auto legit = connect(io, t, r, {0, 0});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  notice_log log;
  log.wait(r);
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 1));
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(log.got[0].second == sl::notice{0, sl::notice_kind::commit, 1});
  CHECK(same(staging, arena));
}

TEST_CASE("verbs control: silent clients hold only their own handshakes; a sender connecting behind them is served") {
  if (!have_device()) return;
  asio::io_context io;
  sv::options o;
  // An hour: were the listener held by a silent client, run_until's guard would fail this.
  o.connect_timeout = std::chrono::hours(1);
  sv::verbs_transport t(io.get_executor(), keyed(o));
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("w", arena);
  // Connected first, so accepted first (the listen backlog is first in, first out).
  std::vector<std::unique_ptr<raw_client>> silent;
  for (int i = 0; i < 3; ++i) silent.push_back(std::make_unique<raw_client>(io, r.local_endpoint(), ""));
  std::vector<std::byte> staging(4096);
  fill(staging, 17);
  auto reg = t.register_memory(staging);
  auto legit = connect(io, t, r, {0, 0});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  CHECK(legit.sender == 0);
  notice_log log;
  log.wait(r);
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 1));
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(log.got[0].second == sl::notice{0, sl::notice_kind::commit, 1});
  CHECK(same(staging, arena));
  for (const auto& c : silent) CHECK_FALSE(c->end.has_value());  // their handshakes still run
  r.close();  // drops them: end of file, nothing sent
  REQUIRE(run_until(io, [&] { return std::all_of(silent.begin(), silent.end(), [](auto& c) { return c->end.has_value(); }); }));
  for (const auto& c : silent) CHECK(c->got.empty());
}

TEST_CASE("verbs control: a sender asking for more queue pairs than options::max_queue_pairs is refused; the receiver "
          "serves on") {
  if (!have_device()) return;
  asio::io_context io;
  sv::options ro;
  ro.max_queue_pairs = 2;
  sv::verbs_transport rt(io.get_executor(), keyed(ro));
  sv::verbs_transport::receiver r(rt, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("w", arena);
  sv::options so;
  so.queue_pairs = 4;
  sv::verbs_transport greedy(io.get_executor(), keyed(so));
  auto refused = connect(io, greedy, r, {0, 0});
  CHECK(refused.accept_ec == sl::errc::protocol_error);
  CHECK(refused.connect_ec);
  CHECK_FALSE(refused.conn.has_value());
  // A sender within the limit is served.
  std::vector<std::byte> staging(4096);
  fill(staging, 19);
  auto reg = rt.register_memory(staging);
  auto legit = connect(io, rt, r, {0, 0});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  notice_log log;
  log.wait(r);
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 1));
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(same(staging, arena));
}

namespace {
// An admitted sender done by hand (hello, verdict, a made-up QP, the table), which then
// sends a malformed notice frame.
asio::awaitable<void> garbage_notice(asio::ip::tcp::endpoint ep, ibv_gid gid, std::string* table,
                                     std::error_code* end, bool* done) {
  asio::ip::tcp::socket s(co_await asio::this_coro::executor);
  co_await s.async_connect(ep, asio::use_awaitable);
  const auto hello = sd::encode_hello(sv::detail::hello_magic, {7, 0});
  co_await asio::async_write(s, asio::buffer(hello), asio::use_awaitable);
  // It holds the key: the proof, by hand.
  auto proof = std::make_unique<sd::psk_session>(test_key());
  co_await asio::async_read(s, asio::buffer(proof->challenge), asio::use_awaitable);
  proof->make_proof(sv::detail::hello_magic, hello);
  co_await asio::async_write(s, asio::buffer(proof->proof), asio::use_awaitable);
  co_await asio::async_read(s, asio::buffer(proof->answer), asio::use_awaitable);
  if (proof->check_answer(sv::detail::hello_magic, hello)) throw std::runtime_error("the receiver did not prove the key");
  std::array<std::byte, sd::verdict_bytes> verdict{};
  co_await asio::async_read(s, asio::buffer(verdict), asio::use_awaitable);
  const std::string qps = sv::detail::encode_endpoints(gid, {sv::qp_endpoint{0x123, 0}});
  co_await asio::async_write(s, asio::buffer(qps), asio::use_awaitable);
  std::string reply(sv::detail::wire_fixed + 8 + 8, '\0');
  co_await asio::async_read(s, asio::buffer(reply), asio::use_awaitable);
  table->resize(sd::get_le<std::uint64_t>(reply.data() + sv::detail::wire_fixed + 8));
  co_await asio::async_read(s, asio::buffer(*table), asio::use_awaitable);
  // The window keys follow the table (none when the receiver hands out no windows).
  std::string keys(sv::detail::keys_fixed, '\0');
  co_await asio::async_read(s, asio::buffer(keys), asio::use_awaitable);
  std::size_t rows = 0;
  if (!sv::detail::decode_keys_fixed(keys, 1, rows)) throw std::runtime_error("no window keys after the table");
  std::string key_rows(4 * rows * 2, '\0');
  if (!key_rows.empty()) co_await asio::async_read(s, asio::buffer(key_rows), asio::use_awaitable);
  sd::notice_frame bad{};
  bad[0] = std::byte{9};  // no such kind
  // Sealed as a keyed sender seals its first notice: the seal holds, the frame does not parse.
  const auto tag = sd::notice_seal::tag(proof->derive_session_key(sv::detail::hello_magic),
                                        sd::seal_direction::notice, 0, bad);
  co_await asio::async_write(s, std::array{asio::const_buffer(bad.data(), bad.size()), asio::const_buffer(tag.data(), sd::seal_tag_bytes)},
                             asio::use_awaitable);
  char c = 0;
  auto [ec, n] = co_await s.async_read_some(asio::buffer(&c, 1), asio::experimental::as_tuple(asio::use_awaitable));
  (void)n;
  *end = ec;
  *done = true;
}
}  // namespace

TEST_CASE("verbs control: a malformed notice frame is a protocol_error naming its sender, whose connection is dropped") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  r.expose("model", r.allocate(4096));
  std::optional<std::error_code> accepted;
  r.async_accept([&](std::error_code ec, std::uint32_t sender) {
    accepted = ec;
    CHECK(sender == 7);
  });
  notice_log log;
  log.wait(r);
  std::string table;
  std::error_code end;
  bool done = false;
  asio::co_spawn(io, garbage_notice(r.local_endpoint(), t.get_device().gid(), &table, &end, &done),
                 [](std::exception_ptr e) { CHECK_FALSE(e); });
  REQUIRE(run_until(io, [&] { return done && log.got.size() == 1; }));
  REQUIRE(accepted.has_value());
  CHECK_FALSE(*accepted);
  CHECK(sl::region_table::parse(table).regions() == r.regions().regions());
  CHECK(log.got[0].first == sl::errc::protocol_error);
  CHECK(log.got[0].second == sl::notice{7, sl::notice_kind::abort, 0});
  CHECK(end == asio::error::eof);
}

namespace {
// Two RC QPs on one device connected to each other, outside the transport: they reach the
// transport's memory regions by rkey, as another process on the network could.
struct raw_link {
  explicit raw_link(std::shared_ptr<sv::device> dev) {
    cq.reset(ibv_create_cq(dev->context(), 8, nullptr, nullptr, 0));
    REQUIRE(cq);
    requester = std::make_unique<sv::queue_pair>(dev, cq.get(), 4, 1);
    responder = std::make_unique<sv::queue_pair>(dev, cq.get(), 1, 1);
    REQUIRE_FALSE(requester->to_init(0));
    // The responder QP allows everything: what is refused is the memory region's call.
    REQUIRE_FALSE(responder->to_init(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ));
    sv::options o;
    o.retry_count = 1;
    REQUIRE_FALSE(requester->connect(dev->gid(), responder->local(), o));
    REQUIRE_FALSE(responder->connect(dev->gid(), requester->local(), o));
  }
  // One signalled WR on the requester; its work completion status.
  ibv_wc_status run(ibv_wr_opcode op, const sl::local_region& local, std::uint64_t remote, std::uint32_t rkey) {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(local.data), static_cast<std::uint32_t>(local.size), local.key};
    ibv_send_wr wr{};
    wr.opcode = op;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = remote;
    wr.wr.rdma.rkey = rkey;
    ibv_send_wr* bad = nullptr;
    REQUIRE(ibv_post_send(requester->get(), &wr, &bad) == 0);
    ibv_wc wc{};
    // Bounded only so that a lost completion cannot hang the suite.
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (ibv_poll_cq(cq.get(), 1, &wc) == 0) REQUIRE(std::chrono::steady_clock::now() < deadline);
    return wc.status;
  }
  sv::detail::cq_handle cq;
  std::unique_ptr<sv::queue_pair> requester, responder;  // after cq: destroyed first
};
}  // namespace

TEST_CASE("verbs control: memory the receiver owns is adopted: registered on its own, written by the sender, never readable remotely") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("arena.bias", arena);
  std::vector<std::byte> owned(32 * 64 * 2);  // the test's own tensor: bf16 [32, 64]
  const sl::tensor_layout layout{sl::dtype::bf16, {32, 64}};
  r.expose({"adopted.weight", owned, sl::memory_location::host(), layout});
  std::vector<std::byte> staging(owned.size());
  fill(staging, 16);
  auto reg = t.register_memory(staging, sl::memory_location::host());
  CHECK(reg.region().location == sl::memory_location::host());

  auto h = connect(io, t, r);
  REQUIRE_FALSE(h.connect_ec);
  const auto* adopted = h.conn->remote_regions().find("adopted.weight");
  const auto* in_arena = h.conn->remote_regions().find("arena.bias");
  REQUIRE(adopted);
  REQUIRE(in_arena);
  CHECK(adopted->address == reinterpret_cast<std::uintptr_t>(owned.data()));
  CHECK(adopted->length == owned.size());
  CHECK(adopted->location == sl::memory_location::host());
  REQUIRE(adopted->layout.has_value());
  CHECK(*adopted->layout == layout);
  CHECK(adopted->key != in_arena->key);  // its own registration, not an arena's

  const auto w = sl::make_write(reg.region(), staging, *adopted);
  auto f = h.conn->async_write(std::span(&w, 1), asio::use_future);
  REQUIRE(run_until(io, [&] { return f.wait_for(0s) == std::future_status::ready; }));
  CHECK_NOTHROW(f.get());
  CHECK(same(staging, owned));

  // Remote read: a memory region that grants it can be read over a raw link; the adopted
  // one cannot (remote access error), though the same link may write it.
  std::vector<std::byte> readable(4096), sink(4096);
  fill(readable, 17);
  auto dev = t.shared_device();
  sv::memory_region readable_mr(dev, readable, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ);
  sv::memory_region sink_mr(dev, sink, IBV_ACCESS_LOCAL_WRITE);
  {
    raw_link link(dev);
    CHECK(link.run(IBV_WR_RDMA_READ, sink_mr.region(), reinterpret_cast<std::uintptr_t>(readable.data()),
                   readable_mr.rkey()) == IBV_WC_SUCCESS);
    CHECK(same(sink, readable));
    CHECK(link.run(IBV_WR_RDMA_READ, sink_mr.region(), adopted->address, adopted->key) == IBV_WC_REM_ACCESS_ERR);
  }
  {
    // With memory windows the table's key is a registration number that no QP takes (the
    // sender's own QPs carry its windows' rkeys: tests/verbs/test_rkeys.cpp); without, it is
    // the region's rkey, and any QP of the device may write with it.
    raw_link link(dev);
    const auto wrote = link.run(IBV_WR_RDMA_WRITE, readable_mr.region(), adopted->address, adopted->key);
    if (r.memory_windows()) {
      CHECK(wrote == IBV_WC_REM_ACCESS_ERR);
    } else {
      CHECK(wrote == IBV_WC_SUCCESS);
      CHECK(same(readable, std::span(owned).first(readable.size())));
    }
  }
}

TEST_CASE("verbs control: expose and register_memory refuse what they cannot move, naming it") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  std::vector<std::byte> owned(8192);
  const auto refused = [&](sl::exposure e, sl::errc code, std::string_view says) {
    CAPTURE(says);
    try {
      r.expose(std::move(e));
      FAIL("the exposure should have been refused");
    } catch (const sl::error& x) {
      const std::string what = x.what();
      CAPTURE(what);
      CHECK(x.code() == code);
      CHECK(what.find(says) != std::string::npos);
    }
  };
  refused({"gpu.weight", owned, sl::memory_location::cuda(0)}, sl::errc::unsupported_memory,
          "region 'gpu.weight' is cuda_device:0 memory");
  r.expose("a", std::span(owned).first(4096));
  refused({"a", std::span(owned).subspan(4096)}, sl::errc::invalid_argument, "region 'a' is exposed twice");
  refused({"b", std::span(owned).subspan(2048, 4096)}, sl::errc::invalid_argument,
          "region 'b' (4096 bytes) overlaps region 'a'");
  // Unmapped memory cannot be registered: ibv_reg_mr's errno, in words.
  try {
    r.expose("ghost", std::span(reinterpret_cast<std::byte*>(std::uintptr_t{4096}), 1u << 20));
    FAIL("unmapped memory should not register");
  } catch (const sl::error& x) {
    const std::string what = x.what();
    CAPTURE(what);
    CHECK(x.code().category() == std::system_category());
    CHECK(what.find("region 'ghost' (1048576 bytes") != std::string::npos);
    CHECK(what.find("ibv_reg_mr") != std::string::npos);
    CHECK(what.find(std::strerror(x.code().value())) != std::string::npos);
  }
  CHECK(r.regions().size() == 1);
  try {
    (void)t.register_memory(owned, sl::memory_location::cuda(1));
    FAIL("CUDA staging memory is not supported yet");
  } catch (const sl::error& x) {
    CHECK(x.code() == sl::errc::unsupported_memory);
    CHECK(std::string(x.what()).find("staging memory is cuda_device:1 memory") != std::string::npos);
  }
}

// ---- authentication ---------------------------------------------------------------------

TEST_CASE("verbs control: a transport without a key is refused unless it asks to run unauthenticated, before any device is opened") {
  asio::io_context io;
  try {
    sv::verbs_transport t(io.get_executor());
    FAIL("a transport without a key should not construct");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::invalid_argument);
    sl::testing::check_text(e.what(), e.code().message(),
                            {"verbs transport: options::key is not set",
                             "set options::allow_unauthenticated = true to let anyone who reaches the control port "
                             "write the weights"});
  }
}

namespace {
// What `f` writes to stderr.
template <class F>
std::string stderr_of(F f) {
  std::fflush(stderr);
  char path[] = "/tmp/shardline-verbs-stderr-XXXXXX";
  const int file = ::mkstemp(path);
  REQUIRE(file >= 0);
  const int saved = ::dup(2);
  ::dup2(file, 2);
  f();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::string text;
  char buf[512];
  ::lseek(file, 0, SEEK_SET);
  for (ssize_t n; (n = ::read(file, buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
  ::close(file);
  ::unlink(path);
  return text;
}
}  // namespace

TEST_CASE("verbs control: an unauthenticated transport warns once per object, and still serves keyless senders") {
  if (!have_device()) return;
  asio::io_context io;
  sv::options open;
  open.allow_unauthenticated = true;
  std::optional<sv::verbs_transport> t;
  std::optional<sv::verbs_transport::receiver> r;
  const std::string said = stderr_of([&] {
    t.emplace(io.get_executor(), open);
    r.emplace(*t, listen_endpoint());
  });
  CHECK(sl::testing::occurrences(said, "shardline: warning: verbs transport") == 1);
  CHECK(said.find("runs unauthenticated (options::allow_unauthenticated): anyone who reaches its control port "
                  "can write the weights") != std::string::npos);
  CHECK(stderr_of([&] { sv::verbs_transport keyed_one(io.get_executor(), keyed()); }).empty());
  r->expose("model", r->allocate(4096));
  auto h = connect(io, *t, *r, {1, 0});
  CHECK_FALSE(h.accept_ec);
  CHECK_FALSE(h.connect_ec);
}

TEST_CASE("verbs control: an unauthenticated TCP client gets nothing (no verdict, region table or rkey), then the real sender is served") {
  if (!have_device()) return;
  asio::io_context io;
  sv::options o = keyed();
  o.connect_timeout = 1000ms;
  sv::verbs_transport t(io.get_executor(), o);
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("secret.weights", arena);
  const auto rkey = r.regions().regions()[0].key;
  const auto hello = sd::encode_hello(sv::detail::hello_magic, {0, 0});
  const std::string hello_bytes(reinterpret_cast<const char*>(hello.data()), hello.size());
  const auto holds_rkey = [&](const std::string& got) {
    std::string le;
    sd::put_le<std::uint32_t>(le, rkey);
    return got.substr(sd::psk_challenge_bytes).find(le) != std::string::npos;  // the nonce is random
  };

  SUBCASE("a good hello, then silence: the challenge, and the deadline") {
    std::optional<std::error_code> accepted;
    r.async_accept([&](std::error_code ec, std::uint32_t) { accepted = ec; });
    raw_client c(io, r.local_endpoint(), hello_bytes);
    REQUIRE(run_until(io, [&] { return accepted && c.end; }));
    CHECK(*accepted == asio::error::timed_out);
    CHECK(c.got.size() == sd::psk_challenge_bytes);
    CHECK(c.got.substr(0, 4) == "SLAU");
  }
  SUBCASE("a good hello and a made-up proof: the challenge, a failed status without a MAC, the end") {
    std::optional<std::error_code> accepted;
    std::uint32_t who = 99;
    r.async_accept([&](std::error_code ec, std::uint32_t sender) {
      accepted = ec;
      who = sender;
    });
    raw_client c(io, r.local_endpoint(), hello_bytes + std::string(sd::psk_proof_bytes, '\x11'));
    REQUIRE(run_until(io, [&] { return accepted && c.end; }));
    CHECK(*accepted == sl::errc::authentication_failed);
    CHECK(accepted->message() == "authentication failed: the peers do not hold the same key");
    CHECK(who == 0);  // an unproven hello names nobody
    REQUIRE(c.got.size() == sd::psk_challenge_bytes + sd::psk_answer_bytes);
    const std::string answer = c.got.substr(sd::psk_challenge_bytes);
    CHECK(sd::get_le<std::uint32_t>(answer.data()) == static_cast<std::uint32_t>(sl::errc::authentication_failed));
    CHECK(answer.substr(4) == std::string(sd::psk_mac_bytes, '\0'));
    CHECK_FALSE(holds_rkey(c.got));
    CHECK(c.got.find("secret.weights") == std::string::npos);
    CHECK(c.got.find("SLVQ") == std::string::npos);
  }
  // Then a real sender is served, and its writes land.
  std::vector<std::byte> staging(4096);
  fill(staging, 18);
  auto reg = t.register_memory(staging);
  auto legit = connect(io, t, r, {0, 0});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  CHECK(legit.conn->remote_regions().find("secret.weights")->key == rkey);
  notice_log log;
  log.wait(r);
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 1));
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(log.got[0].second == sl::notice{0, sl::notice_kind::commit, 1});
  CHECK(same(staging, arena));
}

TEST_CASE("verbs control: a sender with another key, or none, is refused and sees no region; the receiver serves on") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("model", arena);

  sv::options wrong;
  wrong.key = sl::shared_key::generate();
  sv::verbs_transport intruder(io.get_executor(), wrong);
  auto refused = connect(io, intruder, r, {1, 0});
  CHECK(refused.connect_ec == sl::errc::authentication_failed);
  CHECK(refused.connect_ec.message() == "authentication failed: the peers do not hold the same key");
  CHECK(refused.accept_ec == sl::errc::authentication_failed);
  CHECK(refused.sender == 0);
  CHECK_FALSE(refused.conn.has_value());

  sv::options none;
  none.allow_unauthenticated = true;
  std::optional<sv::verbs_transport> keyless;
  (void)stderr_of([&] { keyless.emplace(io.get_executor(), none); });
  auto also_refused = connect(io, *keyless, r, {1, 0});
  CHECK(also_refused.connect_ec == sl::errc::authentication_failed);
  CHECK(also_refused.accept_ec == sl::errc::peer_disconnected);  // it left instead of proving
  CHECK_FALSE(also_refused.conn.has_value());

  // And a keyed sender never talks to a receiver that holds no key.
  std::optional<sv::verbs_transport> open_t;
  (void)stderr_of([&] { open_t.emplace(io.get_executor(), none); });
  sv::verbs_transport::receiver open_r(*open_t, listen_endpoint());
  open_r.expose("model", open_r.allocate(4096));
  auto wary = connect(io, t, open_r, {1, 0});
  CHECK(wary.connect_ec == sl::errc::authentication_failed);
  CHECK_FALSE(wary.conn.has_value());

  std::vector<std::byte> staging(4096);
  fill(staging, 19);
  auto reg = t.register_memory(staging);
  auto legit = connect(io, t, r, {1, 0});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  notice_log log;
  log.wait(r);
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 1));
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(same(staging, arena));
}

TEST_CASE("verbs control: a client that skips the proof and sends its QPs at once gets nothing: no verdict, QP, region table or window rkey") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("secret.weights", arena);
  const auto hello = sd::encode_hello(sv::detail::hello_magic, {0, 0});
  // A hello, a proof of the right length made of nothing, then the QP exchange as an admitted
  // sender would send it, all in one go.
  std::string bytes(reinterpret_cast<const char*>(hello.data()), hello.size());
  bytes += std::string(sd::psk_proof_bytes, '\x22');
  bytes += sv::detail::encode_endpoints(t.get_device().gid(), {sv::qp_endpoint{0x123, 0}, sv::qp_endpoint{0x124, 0}});
  std::optional<std::error_code> accepted;
  r.async_accept([&](std::error_code ec, std::uint32_t) { accepted = ec; });
  raw_client c(io, r.local_endpoint(), bytes);
  REQUIRE(run_until(io, [&] { return accepted && c.end; }));
  CHECK(*accepted == sl::errc::authentication_failed);
  // The challenge and a failed status without a MAC, then the end: nothing of the exchange.
  CHECK(c.got.size() == sd::psk_challenge_bytes + sd::psk_answer_bytes);
  const std::string after = c.got.substr(sd::psk_challenge_bytes);
  CHECK(after.substr(4) == std::string(sd::psk_mac_bytes, '\0'));
  for (const char* never : {"SLVQ", "SLRV", "SLVK", "secret.weights"}) {
    CAPTURE(never);
    CHECK(c.got.find(never) == std::string::npos);
  }
  // The receiver serves on.
  std::vector<std::byte> staging(4096);
  fill(staging, 24);
  auto reg = t.register_memory(staging);
  auto legit = connect(io, t, r, {0, 0});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  const auto w = sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]);
  std::optional<std::error_code> wrote;
  legit.conn->async_write(std::span(&w, 1), [&](std::error_code ec) { wrote = ec; });
  REQUIRE(run_until(io, [&] { return wrote.has_value(); }));
  CHECK_FALSE(*wrote);
  CHECK(same(staging, arena));
}

namespace {
// What an on-path attacker puts on an admitted, keyed sender's control connection.
enum class forgery { bare_commit, foreign_seal, flipped_tag, replayed_begin };

// A keyed sender by hand, as the real one would do it (hello, proof, verdict, a made-up QP,
// the table), which then injects `what` instead of a sealed notice; `acked` gets the
// receiver's ack of a good notice when there is one (checked against its seal).
asio::awaitable<void> forging_sender(asio::ip::tcp::endpoint ep, ibv_gid gid, forgery what, bool* acked,
                                     std::error_code* end, bool* done) {
  asio::ip::tcp::socket s(co_await asio::this_coro::executor);
  co_await s.async_connect(ep, asio::use_awaitable);
  const auto hello = sd::encode_hello(sv::detail::hello_magic, {7, 0});
  co_await asio::async_write(s, asio::buffer(hello), asio::use_awaitable);
  auto proof = std::make_unique<sd::psk_session>(test_key());
  co_await asio::async_read(s, asio::buffer(proof->challenge), asio::use_awaitable);
  proof->make_proof(sv::detail::hello_magic, hello);
  co_await asio::async_write(s, asio::buffer(proof->proof), asio::use_awaitable);
  co_await asio::async_read(s, asio::buffer(proof->answer), asio::use_awaitable);
  if (proof->check_answer(sv::detail::hello_magic, hello)) throw std::runtime_error("the receiver did not prove the key");
  const auto session = proof->derive_session_key(sv::detail::hello_magic);
  std::array<std::byte, sd::verdict_bytes> verdict{};
  co_await asio::async_read(s, asio::buffer(verdict), asio::use_awaitable);
  if (sd::decode_verdict(verdict)) throw std::runtime_error("refused");
  const std::string qps = sv::detail::encode_endpoints(gid, {sv::qp_endpoint{0x123, 0}});
  co_await asio::async_write(s, asio::buffer(qps), asio::use_awaitable);
  std::string reply(sv::detail::wire_fixed + 8 + 8, '\0');
  co_await asio::async_read(s, asio::buffer(reply), asio::use_awaitable);
  std::string table(sd::get_le<std::uint64_t>(reply.data() + sv::detail::wire_fixed + 8), '\0');
  co_await asio::async_read(s, asio::buffer(table), asio::use_awaitable);
  std::string keys(sv::detail::keys_fixed, '\0');
  co_await asio::async_read(s, asio::buffer(keys), asio::use_awaitable);
  std::size_t rows = 0;
  if (!sv::detail::decode_keys_fixed(keys, 1, rows)) throw std::runtime_error("no window keys after the table");
  std::string key_rows(4 * rows * 2, '\0');
  if (!key_rows.empty()) co_await asio::async_read(s, asio::buffer(key_rows), asio::use_awaitable);

  const auto sealed = [](const sd::session_key& k, sd::seal_direction way, std::uint64_t seq, const sd::notice_frame& f) {
    const auto mac = sd::notice_seal::tag(k, way, seq, f);
    std::string b(reinterpret_cast<const char*>(f.data()), f.size());
    b.append(reinterpret_cast<const char*>(mac.data()), sd::seal_tag_bytes);
    return b;
  };
  const auto commit = sd::encode_notice(sl::notice_kind::commit, 1);
  std::string out;
  switch (what) {
    case forgery::bare_commit:  // as the unsealed protocol sent it: three fill one sealed frame
      for (int i = 0; i < 3; ++i) out.append(reinterpret_cast<const char*>(commit.data()), commit.size());
      break;
    case forgery::foreign_seal: {
      std::array<unsigned char, sd::session_key::size> guess{};
      guess.fill(0x5a);
      out = sealed(sd::session_key(guess), sd::seal_direction::notice, 0, commit);
      break;
    }
    case forgery::flipped_tag:
      out = sealed(session, sd::seal_direction::notice, 0, commit);
      out[sd::notice_bytes + 3] = static_cast<char>(out[sd::notice_bytes + 3] ^ 0x10);
      break;
    case forgery::replayed_begin: {
      const auto begin = sd::encode_notice(sl::notice_kind::begin, 1);
      const std::string good = sealed(session, sd::seal_direction::notice, 0, begin);
      co_await asio::async_write(s, asio::buffer(good), asio::use_awaitable);
      std::string ack(sd::notice_bytes + sd::seal_tag_bytes, '\0');
      co_await asio::async_read(s, asio::buffer(ack), asio::use_awaitable);
      *acked = ack == sealed(session, sd::seal_direction::ack, 0, begin);
      out = good;
      break;
    }
  }
  co_await asio::async_write(s, asio::buffer(out), asio::use_awaitable);
  char c = 0;
  auto [ec, n] = co_await s.async_read_some(asio::buffer(&c, 1), asio::experimental::as_tuple(asio::use_awaitable));
  (void)n;
  *end = ec;
  *done = true;
}
}  // namespace

TEST_CASE("verbs control: a notice that is not sealed under the session (bare, forged, tampered, replayed) is "
          "authentication_failed and ends that connection; the real sender is served after") {
  if (!have_device()) return;
  asio::io_context io;
  sv::verbs_transport t(io.get_executor(), keyed());
  sv::verbs_transport::receiver r(t, listen_endpoint());
  auto arena = r.allocate(4096);
  r.expose("model", arena);
  std::optional<std::error_code> accepted;
  r.async_accept([&](std::error_code ec, std::uint32_t sender) {
    accepted = ec;
    CHECK(sender == 7);
  });
  notice_log log;
  log.wait(r);
  forgery what = forgery::bare_commit;
  SUBCASE("a bare commit") { what = forgery::bare_commit; }
  SUBCASE("a commit sealed under a guessed session key") { what = forgery::foreign_seal; }
  SUBCASE("a sealed commit with one bit of its tag flipped") { what = forgery::flipped_tag; }
  SUBCASE("a good begin, then the same sealed bytes again") { what = forgery::replayed_begin; }
  bool acked = false, done = false;
  std::error_code end;
  asio::co_spawn(io, forging_sender(r.local_endpoint(), t.get_device().gid(), what, &acked, &end, &done),
                 [](std::exception_ptr e) { CHECK_FALSE(e); });
  const std::size_t before = what == forgery::replayed_begin ? 1 : 0;
  if (before) {
    REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
    CHECK_FALSE(log.got[0].first);
    CHECK(log.got[0].second == sl::notice{7, sl::notice_kind::begin, 1});
    log.wait(r);
  }
  REQUIRE(run_until(io, [&] { return done && log.got.size() == before + 1; }));
  REQUIRE(accepted.has_value());
  CHECK_FALSE(*accepted);
  CHECK(acked == (what == forgery::replayed_begin));  // the good begin's ack carried the receiver's seal
  CHECK(log.got[before].first == sl::errc::authentication_failed);
  CHECK(log.got[before].first.message() == "authentication failed: the peers do not hold the same key");
  CHECK(log.got[before].second == sl::notice{7, sl::notice_kind::abort, 0});
  CHECK(end == asio::error::eof);

  // The real sender 7 is served: its sealed notices pass, its bytes land.
  std::vector<std::byte> staging(4096);
  fill(staging, 31);
  auto reg = t.register_memory(staging);
  auto legit = connect(io, t, r, {7, 0});
  REQUIRE_FALSE(legit.accept_ec);
  REQUIRE_FALSE(legit.connect_ec);
  log.wait(r);
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::begin, 2));
  CHECK(write_and_notify(io, *legit.conn, sl::make_write(reg.region(), staging, legit.conn->remote_regions().regions()[0]),
                         sl::notice_kind::commit, 2));
  REQUIRE(run_until(io, [&] { return log.got.size() == before + 2; }));
  CHECK(log.got[before + 1].second == sl::notice{7, sl::notice_kind::begin, 2});
  log.wait(r);
  REQUIRE(run_until(io, [&] { return log.got.size() == before + 3; }));
  CHECK_FALSE(log.got[before + 2].first);
  CHECK(log.got[before + 2].second == sl::notice{7, sl::notice_kind::commit, 2});
  CHECK(same(staging, arena));
}
