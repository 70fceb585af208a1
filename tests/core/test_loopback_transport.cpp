#include <shardline/loopback_transport.hpp>

#include <asio/io_context.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include <cstring>
#include <optional>
#include <vector>

namespace sl = shardline;

namespace {
struct pair_fixture {
  asio::io_context io;
  sl::loopback_transport transport{io.get_executor()};
  sl::loopback_transport::receiver receiver{io.get_executor()};
  std::span<std::byte> arena = receiver.allocate(64);
  pair_fixture() {
    receiver.expose("a", arena.first(32));
    receiver.expose("b", arena.subspan(32, 32));
  }
};
}  // namespace

TEST_CASE("loopback_transport: a batch lands whole, and the notification comes after it") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(32, std::byte{9});
  auto local = f.transport.register_memory(source).region();
  const sl::write_request batch[] = {sl::make_write(local, source, *conn.remote_regions().find("a")),
                                     sl::make_write(local, std::span(source).first(8),
                                                    *conn.remote_regions().find("b"), 24)};
  auto written = conn.async_write_notify(batch, 41, asio::use_future);
  auto notified = f.receiver.async_wait_notification(asio::use_future);
  f.io.run();
  CHECK_NOTHROW(written.get());
  CHECK(notified.get() == 41);
  CHECK(f.arena[0] == std::byte{9});
  CHECK(f.arena[31] == std::byte{9});
  CHECK(f.arena[32] == std::byte{0});
  CHECK(f.arena[56] == std::byte{9});
}

TEST_CASE("loopback_transport: a write outside every exposed region fails and writes nothing") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(40, std::byte{5});
  auto local = f.transport.register_memory(source).region();
  const auto& a = *conn.remote_regions().find("a");
  const sl::write_request batch[] = {sl::make_write(local, std::span(source).first(8), a),
                                     sl::make_write(local, source, a)};  // 40 bytes into 32
  std::optional<std::error_code> result;
  conn.async_write(batch, [&result](std::error_code ec) { result = ec; });
  f.io.run();
  CHECK(result == std::optional<std::error_code>(sl::errc::region_not_exposed));
  CHECK(f.arena[0] == std::byte{0});  // the valid first request was not applied either
}

TEST_CASE("loopback_transport: closed ends fail writes with the matching error") {
  pair_fixture f;
  auto conn = f.transport.connect(f.receiver);
  std::vector<std::byte> source(8);
  const sl::write_request w[] = {sl::make_write(f.transport.register_memory(source).region(), source,
                                                *conn.remote_regions().find("a"))};
  f.receiver.close();
  std::optional<std::error_code> peer_gone, closed;
  conn.async_write(w, [&peer_gone](std::error_code ec) { peer_gone = ec; });
  conn.close();
  conn.async_write(w, [&closed](std::error_code ec) { closed = ec; });
  f.io.run();
  CHECK(peer_gone == std::optional<std::error_code>(sl::errc::peer_disconnected));
  CHECK(closed == std::optional<std::error_code>(sl::errc::not_connected));
  CHECK(!conn.is_open());
}

TEST_CASE("loopback_transport: exposing memory outside an arena is refused by name") {
  pair_fixture f;
  std::vector<std::byte> elsewhere(8);
  CHECK_THROWS_WITH_AS(f.receiver.expose("stray", elsewhere), doctest::Contains("'stray'"),
                       sl::error);
}

TEST_CASE("region_table: serialises and parses back; malformed bytes are an error") {
  sl::region_table t;
  t.add({"model.layers.0.self_attn.qkv_proj.weight", 0x1000, 4096, 77});
  t.add({"b", 1ull << 40, 1, 0});
  const auto bytes = t.serialize();
  const auto back = sl::region_table::parse(bytes);
  CHECK(back.regions() == t.regions());
  std::error_code ec;
  sl::region_table::parse(bytes.substr(0, bytes.size() - 3), ec);
  CHECK(ec == sl::errc::protocol_error);
  CHECK_THROWS_AS(sl::region_table::parse("nonsense"), sl::error);
}
