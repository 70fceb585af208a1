#include <shardline/transport/loopback.hpp>

#include <asio/io_context.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "../support/checks.hpp"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <future>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sl = shardline;
using namespace std::chrono_literals;

using sl::testing::check_throws;
using sl::testing::drive;
using sl::testing::settle;

namespace {

template <class T>
bool ready(const std::future<T>& f) {
  return f.wait_for(0s) == std::future_status::ready;
}

// An asynchronous error: its code, and the code's own message.
void check_code(const std::optional<std::error_code>& ec, sl::errc code) {
  REQUIRE(ec.has_value());
  CHECK(*ec == code);
  CHECK(ec->message() == sl::make_error_code(code).message());
}

void put_u32(std::string& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
void put_u64(std::string& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}

// One entry of format version 2, written independently of region_table::serialize.
void put_entry(std::string& out, std::string_view name, std::uint64_t address, std::uint64_t length) {
  put_u64(out, name.size());
  out += name;
  put_u64(out, address);
  put_u64(out, length);
  put_u32(out, 0);           // key
  out.push_back(0);          // kind: host
  put_u32(out, 0xffffffff);  // device -1
  out.push_back(0);          // no layout
}

std::string v2_header(std::uint64_t count) {
  std::string out = "SLRV";
  put_u32(out, 2);
  put_u64(out, count);
  return out;
}

// The name of the region find(address, length) returns, or "(none)".
std::string found(const sl::region_table& t, std::uint64_t address, std::uint64_t length) {
  const auto* r = t.find(address, length);
  return r ? r->name : "(none)";
}

sl::region_table sample_table() {
  sl::region_table t;
  t.add({"model.layers.0.self_attn.qkv_proj.weight", 0x1000, 4096, 77, sl::memory_location::host_pinned(),
         sl::tensor_layout{sl::dtype::bf16, {32, 64}}});
  t.add({"bytes", 1ull << 40, 3, 0, sl::memory_location::cuda(3), std::nullopt});
  t.add({"empty", 0x9000, 0, 5, {}, sl::tensor_layout{sl::dtype::f32, {0, 8}}});
  t.add({"scalar", 0x20000, 8, 1, {}, sl::tensor_layout{sl::dtype::i64, {}}});
  return t;
}

struct pair_fixture {
  asio::io_context io;
  sl::loopback_transport transport{io.get_executor()};
  sl::loopback_transport::receiver receiver;
  std::span<std::byte> arena;
  explicit pair_fixture(std::size_t notice_depth = 64) : receiver(io.get_executor(), notice_depth) {
    arena = receiver.allocate(64);
    receiver.expose("a", arena.first(32));
    receiver.expose("b", arena.subspan(32, 32));
  }
};

// A notice as async_wait_notification delivers it.
struct received {
  std::optional<std::error_code> ec;
  sl::notice n;
  bool done() const { return ec.has_value(); }
};

template <class Receiver>
void wait_notice(Receiver& r, received& out) {
  r.async_wait_notification([&out](std::error_code ec, sl::notice n) {
    out.ec = ec;
    out.n = n;
  });
}

}  // namespace

// region_table ------------------------------------------------------------------------------

TEST_CASE("region_table: a round trip keeps name, address, length, key, location and layout") {
  const sl::region_table t = sample_table();
  const std::string bytes = t.serialize();
  std::error_code ec = sl::make_error_code(sl::errc::protocol_error);
  const auto back = sl::region_table::parse(bytes, ec);
  CHECK(!ec);
  REQUIRE(back.size() == 4);
  CHECK(back.regions() == t.regions());
  const auto* qkv = back.find("model.layers.0.self_attn.qkv_proj.weight");
  REQUIRE(qkv != nullptr);
  CHECK(qkv->address == 0x1000);
  CHECK(qkv->length == 4096);
  CHECK(qkv->key == 77);
  CHECK(qkv->location == sl::memory_location::host_pinned());
  CHECK(qkv->layout == sl::tensor_layout{sl::dtype::bf16, {32, 64}});
  const auto* raw = back.find("bytes");
  REQUIRE(raw != nullptr);
  CHECK(raw->location == sl::memory_location::cuda(3));
  CHECK(raw->location.device == 3);
  CHECK(!raw->layout.has_value());
  CHECK(back.find("scalar")->layout == sl::tensor_layout{sl::dtype::i64, {}});
  CHECK(back.find("empty")->length == 0);
  // The parsed table is indexed too, and encodes to the same bytes.
  CHECK(back.find(0x1000 + 100, 16) == qkv);
  CHECK(back.serialize() == bytes);
  CHECK(sl::region_table::parse(sl::region_table{}.serialize()).empty());
}

TEST_CASE("region_table: a table of the first format (SLRT) is a version mismatch naming versions 1 and 2") {
  // Format 1: "SLRT", u64 count, then per region u64 name length, name, u64 address, length, key.
  std::string v1 = "SLRT";
  put_u64(v1, 1);
  put_u64(v1, 1);
  v1 += "a";
  put_u64(v1, 0x1000);
  put_u64(v1, 16);
  put_u64(v1, 0);
  std::error_code ec;
  const auto t = sl::region_table::parse(v1, ec);
  CHECK(ec == sl::errc::protocol_version_mismatch);
  CHECK(t.empty());
  check_throws([&] { sl::region_table::parse(v1); }, sl::errc::protocol_version_mismatch,
               {"region table", "version 1", "speaks 2"});
}

TEST_CASE("region_table: SLRV of format version 3 is a version mismatch naming versions 3 and 2") {
  std::string v3 = "SLRV";
  put_u32(v3, 3);
  put_u64(v3, 0);
  std::error_code ec;
  CHECK(sl::region_table::parse(v3, ec).empty());
  CHECK(ec == sl::errc::protocol_version_mismatch);
  check_throws([&] { sl::region_table::parse(v3); }, sl::errc::protocol_version_mismatch,
               {"region table", "version 3", "speaks 2"});
}

TEST_CASE("region_table: a table cut short at any byte is a protocol error, never a crash") {
  const std::string bytes = sample_table().serialize();
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    CAPTURE(n);
    std::error_code ec;
    const auto t = sl::region_table::parse(std::string_view(bytes).substr(0, n), ec);
    CHECK(ec == sl::errc::protocol_error);
    CHECK(t.empty());
  }
  check_throws([&] { sl::region_table::parse(std::string_view(bytes).substr(0, bytes.size() - 3)); },
               sl::errc::protocol_error, {"region table", "malformed"});
  check_throws([] { sl::region_table::parse("nonsense"); }, sl::errc::protocol_error, {"region table"});
}

TEST_CASE("region_table: a count of 2^40 entries is a protocol error, refused before allocating") {
  for (const std::uint64_t count : {std::uint64_t{1} << 40, ~std::uint64_t{0}}) {
    CAPTURE(count);
    std::string bytes = v2_header(count);
    put_entry(bytes, "a", 0x1000, 16);  // one real entry after the lie
    std::error_code ec;
    CHECK(sl::region_table::parse(bytes, ec).empty());
    CHECK(ec == sl::errc::protocol_error);
    check_throws([&] { sl::region_table::parse(bytes); }, sl::errc::protocol_error, {"region table", "count"});
  }
}

TEST_CASE("region_table: a parsed table with a name twice or an overlap is a protocol error naming both") {
  std::string twice = v2_header(2);
  put_entry(twice, "w", 0x1000, 16);
  put_entry(twice, "w", 0x2000, 16);
  check_throws([&] { sl::region_table::parse(twice); }, sl::errc::protocol_error, {"'w'", "twice"});
  std::string overlap = v2_header(2);
  put_entry(overlap, "first", 0x1000, 16);
  put_entry(overlap, "second", 0x1008, 16);
  check_throws([&] { sl::region_table::parse(overlap); }, sl::errc::protocol_error,
               {"'first'", "'second'", "overlaps"});
}

TEST_CASE("region_table: add() refuses a name given twice and an overlap, naming both regions") {
  sl::region_table t;
  t.add({"a", 0x1000, 16});
  check_throws([&] { t.add({"a", 0x5000, 16}); }, sl::errc::invalid_argument, {"'a'", "twice"});
  // Overlapping from above, from below, and covering the region whole.
  check_throws([&] { t.add({"b", 0x1008, 16}); }, sl::errc::invalid_argument, {"'b'", "'a'", "overlaps"});
  check_throws([&] { t.add({"c", 0x0ff8, 16}); }, sl::errc::invalid_argument, {"'c'", "'a'", "overlaps"});
  check_throws([&] { t.add({"d", 0x0800, 0x1000}); }, sl::errc::invalid_argument, {"'d'", "'a'", "overlaps"});
  check_throws([&] { t.add({"e", ~std::uint64_t{0} - 4, 16}); }, sl::errc::invalid_argument, {"'e'", "overflows"});
  CHECK(t.size() == 1);
  // Neighbours that only touch are no overlap.
  t.add({"below", 0x0ff0, 16});
  t.add({"above", 0x1010, 16});
  CHECK(t.size() == 3);
  CHECK(t.find(0x0ff0, 48) == nullptr);  // spans three regions
  CHECK(found(t, 0x1010, 16) == "above");
  // The explicit constructor adds through add().
  CHECK_THROWS_AS(sl::region_table({{"x", 0, 8}, {"y", 4, 8}}), sl::error);
}

TEST_CASE("region_table: find(address, length) among 100,000 regions, at the start, middle and end") {
  // Region i starts at base + 256 i; even regions are 256 bytes (they touch the next one),
  // odd regions 128 (a gap of 128 bytes follows).
  constexpr std::uint64_t base = 0x10000, n = 100'000;
  std::vector<sl::remote_region> regions;
  regions.reserve(n);
  for (std::uint64_t i = 0; i < n; ++i)
    regions.push_back({"r" + std::to_string(i), base + 256 * i, i % 2 == 0 ? 256u : 128u});
  const sl::region_table t(std::move(regions));
  REQUIRE(t.size() == n);
  for (const std::uint64_t i : {std::uint64_t{0}, std::uint64_t{1}, n / 2, n / 2 + 1, n - 2, n - 1}) {
    CAPTURE(i);
    const std::uint64_t start = base + 256 * i, length = i % 2 == 0 ? 256 : 128;
    const std::string name = "r" + std::to_string(i);
    CHECK(found(t, start, length) == name);       // all of it
    CHECK(found(t, start, 1) == name);            // its first byte
    CHECK(found(t, start + length - 1, 1) == name);  // its last byte
    CHECK(found(t, start + 10, 20) == name);      // inside
    CHECK(t.find(start, length + 1) == nullptr);      // one byte too many
    CHECK(t.find(name)->address == start);
    if (i % 2 == 1) {
      CHECK(t.find(start + 128, 1) == nullptr);   // the gap after an odd region
      CHECK(t.find(start + 200, 8) == nullptr);
      CHECK(t.find(start + 120, 16) == nullptr);  // from the region into the gap
      CHECK(!t.covers(start + 120, 16));
    } else {
      CHECK(t.find(start + 250, 12) == nullptr);  // across two touching regions
      CHECK(t.covers(start + 250, 12));             // which a coalesced write may do
      CHECK(t.covers(start, 256 + 128));
      CHECK(!t.covers(start, 256 + 129));           // but not into the gap after them
    }
    CHECK(t.covers(start + 10, 20));
  }
  CHECK(t.find(base - 1, 1) == nullptr);          // before the first
  CHECK(t.find(0, 0) == nullptr);
  CHECK(t.find(base + 256 * n, 1) == nullptr);     // after the last
  CHECK(t.find("r100000") == nullptr);
}

TEST_CASE("region_table: zero-length regions are named, found, encoded, and never overlap") {
  sl::region_table t;
  t.add({"empty", 0x100, 0});
  t.add({"also empty", 0x100, 0});  // no byte, so no overlap even at one address
  t.add({"at start", 0x1000, 0});
  t.add({"tensor", 0x1000, 64});    // starts where an empty region sits
  t.add({"at end", 0x1040, 0});     // one past its end
  CHECK(t.size() == 5);
  CHECK(t.find("empty")->length == 0);
  CHECK(t.find(0x100, 0) != nullptr);
  CHECK(t.find(0x100, 1) == nullptr);
  CHECK(found(t, 0x1000, 64) == "tensor");
  CHECK(found(t, 0x1000, 1) == "tensor");
  CHECK(found(t, 0x103f, 1) == "tensor");
  CHECK(t.find(0x1040, 0) != nullptr);
  CHECK(t.find(0x1040, 1) == nullptr);
  // An empty region where a region already begins does not hide it either.
  t.add({"late empty", 0x1000, 0});
  CHECK(found(t, 0x1000, 64) == "tensor");
  check_throws([&] { t.add({"empty", 0x5000, 0}); }, sl::errc::invalid_argument, {"'empty'", "twice"});
  const auto back = sl::region_table::parse(t.serialize());
  CHECK(back.regions() == t.regions());
  CHECK(found(back, 0x1000, 64) == "tensor");
}

TEST_CASE("region_table: a zero-length region inside a region hides neither its bytes nor an overlap") {
  sl::region_table t;
  t.add({"tensor", 0x1000, 0x100});
  t.add({"inside", 0x1080, 0});  // holds no byte: allowed anywhere
  CHECK(found(t, 0x1000, 0x100) == "tensor");
  CHECK(found(t, 0x1090, 16) == "tensor");  // past the empty region's address
  CHECK(t.covers(0x1090, 16));
  // Overlaps are still seen across the empty region, from either side.
  check_throws([&] { t.add({"overlapping", 0x1090, 16}); }, sl::errc::invalid_argument,
               {"'overlapping'", "'tensor'", "overlaps"});
  sl::region_table u;
  u.add({"gap marker", 0x1800, 0});
  u.add({"high", 0x1c00, 0x100});
  check_throws([&] { u.add({"wide", 0x1000, 0x1000}); }, sl::errc::invalid_argument,
               {"'wide'", "'high'", "overlaps"});
}

// loopback_transport ------------------------------------------------------------------------

TEST_CASE("loopback_transport: a batch lands whole, and a notice sent after it comes after it") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver, {4, 0});
  CHECK(conn.identity().sender == 4);
  std::vector<std::byte> source(32, std::byte{9});
  auto local = f.transport.register_memory(source).region();
  const sl::write_request batch[] = {sl::make_write(local, source, *conn.remote_regions().find("a")),
                                     sl::make_write(local, std::span(source).first(8),
                                                    *conn.remote_regions().find("b"), 24)};
  auto written = conn.async_write(batch, asio::use_future);
  REQUIRE(drive(f.io, [&] { return ready(written); }));
  CHECK_NOTHROW(written.get());

  auto acknowledged = conn.async_notify(sl::notice_kind::commit, 41, asio::use_future);
  received got;
  bool landed_when_seen = false;
  f.receiver.async_wait_notification([&](std::error_code ec, sl::notice n) {
    got.ec = ec;
    got.n = n;
    landed_when_seen = f.arena[0] == std::byte{9} && f.arena[31] == std::byte{9} && f.arena[56] == std::byte{9};
  });
  REQUIRE(drive(f.io, [&] { return got.done() && ready(acknowledged); }));
  CHECK_NOTHROW(acknowledged.get());
  CHECK(!*got.ec);
  CHECK(got.n == sl::notice{4, sl::notice_kind::commit, 41});
  CHECK(landed_when_seen);
  CHECK(f.arena[32] == std::byte{0});
  CHECK(f.arena[55] == std::byte{0});
  CHECK(f.arena[63] == std::byte{9});
}

TEST_CASE("loopback_transport: notices of one sender arrive in order, each kind intact") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver, {1, 0});
  const sl::notice_kind kinds[] = {sl::notice_kind::begin, sl::notice_kind::commit, sl::notice_kind::abort,
                                   sl::notice_kind::withdraw};
  std::vector<std::future<void>> acks;
  for (std::uint32_t i = 0; i < 4; ++i) acks.push_back(conn.async_notify(kinds[i], 10 + i, asio::use_future));
  for (std::uint32_t i = 0; i < 4; ++i) {
    received got;
    wait_notice(f.receiver, got);
    REQUIRE(drive(f.io, [&] { return got.done(); }));
    CHECK(!*got.ec);
    CHECK(got.n == sl::notice{1, kinds[i], 10 + i});
  }
  REQUIRE(drive(f.io, [&] { return ready(acks.back()); }));
  for (auto& a : acks) CHECK_NOTHROW(a.get());
}

TEST_CASE("loopback_transport: async_notify completes only once the receiver holds the notice") {
  pair_fixture f(0);  // no queue: a notice is held only when the receiver takes it
  auto conn = f.transport.connect(f.receiver);
  std::optional<std::error_code> ack;
  conn.async_notify(sl::notice_kind::begin, 1, [&ack](std::error_code ec) { ack = ec; });
  settle(f.io);
  CHECK(!ack.has_value());
  received got;
  wait_notice(f.receiver, got);
  REQUIRE(drive(f.io, [&] { return got.done() && ack.has_value(); }));
  CHECK(!*ack);
  CHECK(got.n == sl::notice{0, sl::notice_kind::begin, 1});
}

TEST_CASE("loopback_transport: a write outside every exposed region fails and writes nothing") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(40, std::byte{5});
  auto local = f.transport.register_memory(source).region();
  const auto& a = *conn.remote_regions().find("a");
  const auto& b = *conn.remote_regions().find("b");
  const sl::write_request batch[] = {sl::make_write(local, std::span(source).first(8), a),
                                     sl::make_write(local, source, b)};  // 40 bytes into the last 32
  std::optional<std::error_code> result;
  conn.async_write(batch, [&result](std::error_code ec) { result = ec; });
  REQUIRE(drive(f.io, [&] { return result.has_value(); }));
  check_code(result, sl::errc::region_not_exposed);
  CHECK(f.arena[0] == std::byte{0});  // the valid first request was not applied either
  CHECK(conn.is_open());              // and the connection is still usable
  const sl::write_request fine[] = {sl::make_write(local, std::span(source).first(8), a)};
  result.reset();
  conn.async_write(fine, [&result](std::error_code ec) { result = ec; });
  REQUIRE(drive(f.io, [&] { return result.has_value(); }));
  CHECK(!*result);
  CHECK(f.arena[0] == std::byte{5});
}

TEST_CASE("loopback_transport: one request over two touching regions lands (a coalesced write)") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(48, std::byte{7});
  auto local = f.transport.register_memory(source).region();
  const sl::write_request w[] = {sl::make_write(local, source, *conn.remote_regions().find("a"), 8)};
  std::optional<std::error_code> result;
  conn.async_write(w, [&result](std::error_code ec) { result = ec; });
  REQUIRE(drive(f.io, [&] { return result.has_value(); }));
  CHECK(!*result);
  CHECK(f.arena[7] == std::byte{0});
  CHECK(f.arena[8] == std::byte{7});
  CHECK(f.arena[55] == std::byte{7});
  CHECK(f.arena[56] == std::byte{0});
}

TEST_CASE("loopback_transport: closed ends fail writes and notices with the matching error") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(8);
  const sl::write_request w[] = {sl::make_write(f.transport.register_memory(source).region(), source,
                                                *conn.remote_regions().find("a"))};
  f.receiver.close();
  CHECK(!conn.is_open());
  std::optional<std::error_code> write_peer_gone, notify_peer_gone, write_closed, notify_closed;
  conn.async_write(w, [&](std::error_code ec) { write_peer_gone = ec; });
  conn.async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { notify_peer_gone = ec; });
  conn.close();
  conn.async_write(w, [&](std::error_code ec) { write_closed = ec; });
  conn.async_notify(sl::notice_kind::commit, 2, [&](std::error_code ec) { notify_closed = ec; });
  REQUIRE(drive(f.io, [&] {
    return write_peer_gone && notify_peer_gone && write_closed && notify_closed;
  }));
  check_code(write_peer_gone, sl::errc::peer_disconnected);
  check_code(notify_peer_gone, sl::errc::peer_disconnected);
  check_code(write_closed, sl::errc::not_connected);
  check_code(notify_closed, sl::errc::not_connected);
  CHECK(!conn.is_open());
  check_throws([&] { f.transport.connect(f.receiver); }, sl::errc::not_connected, {"receiver is closed"});
}

TEST_CASE("loopback_transport: a notice the receiver has not taken when it closes fails with peer_disconnected") {
  pair_fixture f(0);
  auto conn = f.transport.connect(f.receiver);
  std::optional<std::error_code> ack;
  conn.async_notify(sl::notice_kind::commit, 3, [&ack](std::error_code ec) { ack = ec; });
  settle(f.io);
  REQUIRE(!ack.has_value());
  f.receiver.close();
  CHECK(drive(f.io, [&] { return ack.has_value(); }));
  if (ack) check_code(ack, sl::errc::peer_disconnected);
}

TEST_CASE("loopback_transport: closing the receiver ends a pending async_wait_notification with an error") {
  pair_fixture f;
  received got;
  wait_notice(f.receiver, got);
  settle(f.io);
  CHECK(!got.done());
  f.receiver.close();
  REQUIRE(drive(f.io, [&] { return got.done(); }));
  CHECK(*got.ec);
}

TEST_CASE("loopback_transport: close() delivers (peer_disconnected, notice{sender, abort, 0}) after the sender's notices") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver, {3, 0});
  auto other = f.transport.connect(f.receiver, {5, 0});
  std::optional<std::error_code> ack;
  conn.async_notify(sl::notice_kind::begin, 9, [&ack](std::error_code ec) { ack = ec; });
  REQUIRE(drive(f.io, [&] { return ack.has_value(); }));
  conn.close();
  conn.close();  // once only
  CHECK(!conn.is_open());
  CHECK(other.is_open());
  received first, second;
  wait_notice(f.receiver, first);
  REQUIRE(drive(f.io, [&] { return first.done(); }));
  CHECK(!*first.ec);
  CHECK(first.n == sl::notice{3, sl::notice_kind::begin, 9});
  wait_notice(f.receiver, second);
  REQUIRE(drive(f.io, [&] { return second.done(); }));
  check_code(second.ec, sl::errc::peer_disconnected);
  CHECK(second.n == sl::notice{3, sl::notice_kind::abort, 0});
  // Nothing more from that sender; the other one is still served.
  received third;
  wait_notice(f.receiver, third);
  settle(f.io);
  CHECK(!third.done());
  ack.reset();
  other.async_notify(sl::notice_kind::commit, 1, [&ack](std::error_code ec) { ack = ec; });
  REQUIRE(drive(f.io, [&] { return third.done() && ack.has_value(); }));
  CHECK(!*third.ec);
  CHECK(third.n == sl::notice{5, sl::notice_kind::commit, 1});
}

TEST_CASE("loopback_transport: close() reaches the receiver even when its notice queue is full") {
  pair_fixture f(1);
  auto conn = f.transport.connect(f.receiver, {2, 0});
  std::optional<std::error_code> ack;
  conn.async_notify(sl::notice_kind::commit, 1, [&ack](std::error_code ec) { ack = ec; });
  REQUIRE(drive(f.io, [&] { return ack.has_value(); }));  // queued: the queue is full now
  conn.close();
  received first, second;
  wait_notice(f.receiver, first);
  REQUIRE(drive(f.io, [&] { return first.done(); }));
  CHECK(first.n == sl::notice{2, sl::notice_kind::commit, 1});
  wait_notice(f.receiver, second);
  CHECK(drive(f.io, [&] { return second.done(); }));
  if (second.done()) {
    check_code(second.ec, sl::errc::peer_disconnected);
    CHECK(second.n == sl::notice{2, sl::notice_kind::abort, 0});
  }
}

TEST_CASE("loopback_transport: admission refuses another plan's sender and an id out of range") {
  pair_fixture f;
  f.receiver.admit({2, 0xfeed});
  check_throws([&] { f.transport.connect(f.receiver, {0, 0xbeef}); }, sl::errc::plan_mismatch, {"sender 0"});
  check_throws([&] { f.transport.connect(f.receiver, {2, 0xfeed}); }, sl::errc::unknown_sender, {"sender 2"});
  check_throws([&] { f.transport.connect(f.receiver, {7, 0xbeef}); }, sl::errc::unknown_sender, {"sender 7"});
  auto admitted = f.transport.connect(f.receiver, {1, 0xfeed});
  CHECK(admitted.is_open());
  CHECK(admitted.identity().sender == 1);
  CHECK(admitted.identity().plan_fingerprint == 0xfeed);
  CHECK(admitted.remote_regions().size() == 2);
  // admit() applies from now on; 0 accepts any id and any plan.
  f.receiver.admit({});
  CHECK_NOTHROW(f.transport.connect(f.receiver, {7, 0xbeef}));
}

TEST_CASE("loopback_transport: a second open connection of one sender id is refused, naming the id; it may reconnect once closed") {
  pair_fixture f;
  auto first = f.transport.connect(f.receiver, {3, 0});
  check_throws([&] { f.transport.connect(f.receiver, {3, 0}); }, sl::errc::invalid_argument,
               {"sender 3", "still open"});
  // Another id, and the same id at another receiver, are not affected.
  CHECK(f.transport.connect(f.receiver, {4, 0}).is_open());
  sl::loopback_transport::receiver elsewhere(f.io.get_executor());
  CHECK(f.transport.connect(elsewhere, {3, 0}).is_open());
  // A moved connection still holds the id; closing it frees the id.
  auto moved = std::move(first);
  check_throws([&] { f.transport.connect(f.receiver, {3, 0}); }, sl::errc::invalid_argument, {"sender 3"});
  moved.close();
  auto again = f.transport.connect(f.receiver, {3, 0});
  CHECK(again.is_open());
  // Destroying a connection closes it, and frees the id too.
  std::optional<sl::loopback_transport::connection> scoped(f.transport.connect(f.receiver, {8, 0}));
  scoped.reset();
  CHECK(f.transport.connect(f.receiver, {8, 0}).is_open());
  // A refused duplicate leaves the open connection alone.
  CHECK(again.is_open());
  std::vector<std::byte> source(8, std::byte{6});
  const sl::write_request w[] = {sl::make_write(f.transport.register_memory(source).region(), source,
                                                *again.remote_regions().find("a"))};
  std::optional<std::error_code> result;
  again.async_write(w, [&result](std::error_code ec) { result = ec; });
  REQUIRE(drive(f.io, [&] { return result.has_value(); }));
  CHECK(!*result);
  CHECK(f.arena[0] == std::byte{6});
}

TEST_CASE("loopback_transport: a write that landed but completes after close() reports operation_aborted") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(8, std::byte{2});
  const sl::write_request w[] = {sl::make_write(f.transport.register_memory(source).region(), source,
                                                *conn.remote_regions().find("b"))};
  std::optional<std::error_code> result;
  conn.async_write(w, [&result](std::error_code ec) { result = ec; });
  CHECK(!result.has_value());  // the completion is posted, never run inline
  conn.close();
  REQUIRE(drive(f.io, [&] { return result.has_value(); }));
  CHECK(*result == asio::error::operation_aborted);
  CHECK(f.arena[32] == std::byte{2});  // it did land
}

TEST_CASE("loopback_transport: cuda_device memory is refused by register_memory and expose, naming it and the kinds") {
  pair_fixture f;
  std::vector<std::byte> bytes(16);
  check_throws([&] { f.transport.register_memory(bytes, sl::memory_location::cuda(0)); },
               sl::errc::unsupported_memory, {"staging memory", "cuda_device:0", "{host, host_pinned}"});
  check_throws([&] {
    f.receiver.expose({"layers.0.mlp.w", bytes, sl::memory_location::cuda(1), sl::tensor_layout{sl::dtype::bf16, {8}}});
  }, sl::errc::unsupported_memory, {"'layers.0.mlp.w'", "cuda_device:1", "{host, host_pinned}"});
  CHECK(f.receiver.regions().find("layers.0.mlp.w") == nullptr);
  // Both host kinds are fine.
  CHECK(f.transport.register_memory(bytes, sl::memory_location::host_pinned()).region().location ==
        sl::memory_location::host_pinned());
  f.receiver.expose({"pinned", bytes, sl::memory_location::host_pinned(), std::nullopt});
  CHECK(f.receiver.regions().find("pinned")->location == sl::memory_location::host_pinned());
}

TEST_CASE("loopback_transport: memory the caller owns (not from allocate) is exposed and written") {
  pair_fixture f;
  std::vector<std::byte> engine(24);  // an inference engine's tensor
  f.receiver.expose({"engine.weight", engine, sl::memory_location::host(), sl::tensor_layout{sl::dtype::bf16, {3, 4}}});
  const auto* region = f.receiver.regions().find("engine.weight");
  REQUIRE(region != nullptr);
  CHECK(region->address == reinterpret_cast<std::uintptr_t>(engine.data()));
  CHECK(region->length == 24);
  CHECK(region->layout == sl::tensor_layout{sl::dtype::bf16, {3, 4}});
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(24);
  for (std::size_t i = 0; i < source.size(); ++i) source[i] = std::byte(0x30 + i);
  const auto local = f.transport.register_memory(source).region();
  const sl::write_request w[] = {sl::make_write(local, source, *conn.remote_regions().find("engine.weight"))};
  std::optional<std::error_code> result;
  conn.async_write(w, [&result](std::error_code ec) { result = ec; });
  REQUIRE(drive(f.io, [&] { return result.has_value(); }));
  CHECK(!*result);
  CHECK(engine == source);
  // The caller's memory is checked as any region: a name twice or an overlap names both.
  check_throws([&] { f.receiver.expose("engine.weight", std::span(engine).first(2)); }, sl::errc::invalid_argument,
               {"'engine.weight'", "twice"});
  check_throws([&] { f.receiver.expose("engine.tail", std::span(engine).subspan(20)); }, sl::errc::invalid_argument,
               {"'engine.tail'", "'engine.weight'", "overlaps"});
}
