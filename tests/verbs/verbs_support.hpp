// What the verbs suites share: the device check, the listen address inside the Soft-RoCE
// VM, running io_contexts until something happened, and a connected receiver + sender.
#pragma once

#include <shardline/transport/verbs/transport.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace verbs_test {

namespace sl = shardline;
namespace sv = shardline::verbs;
using namespace std::chrono_literals;

inline bool have_device() {
  if (!sv::device_list().empty()) return true;
  std::printf("skipped: no RDMA device (run the verbs suite inside tests/rxe/run)\n");
  return false;
}

// The suites' fixed key: every transport of a test holds it unless the test says otherwise.
inline const sl::shared_key& test_key() {
  static const sl::shared_key k = [] {
    std::vector<std::byte> b(sl::shared_key::size);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(0x40 + i);
    return sl::shared_key::from_bytes(b);
  }();
  return k;
}

// `o` with the suites' key, unless it holds a key or asks to run without one.
inline sv::options keyed(sv::options o = {}) {
  if (!o.key && !o.allow_unauthenticated) o.key = test_key();
  return o;
}

inline asio::ip::tcp::endpoint listen_endpoint() {
  const char* a = std::getenv("RXE_ADDRESS");
  return {asio::ip::make_address(a && *a ? a : "127.0.0.2"), 0};
}

// Runs the contexts, taking turns, until `done()`; the bound only keeps a lost completion
// from hanging the suite.
template <class Done>
bool run_until(std::initializer_list<asio::io_context*> ios, Done done,
               std::chrono::seconds bound = 120s) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  for (auto* io : ios) io->restart();
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    for (auto* io : ios) {
      io->run_one_for(ios.size() > 1 ? 5ms : 100ms);
      if (io->stopped()) io->restart();
    }
  }
  return done();
}

template <class Done>
bool run_until(asio::io_context& io, Done done, std::chrono::seconds bound = 120s) {
  return run_until({&io}, done, bound);
}

inline void fill(std::span<std::byte> b, unsigned seed) {
  for (std::size_t i = 0; i < b.size(); ++i)
    b[i] = static_cast<std::byte>((i * 131 + seed * 7 + (i >> 8)) & 0xff);
}

inline bool same(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

inline bool all_zero(std::span<const std::byte> b) {
  for (auto x : b)
    if (x != std::byte{0}) return false;
  return true;
}

// What one async_accept + async_connect pair ended with.
template <class T>
struct handshake {
  std::error_code accept_ec = sl::errc::protocol_error;
  std::error_code connect_ec = sl::errc::protocol_error;
  std::uint32_t sender = ~0u;
  std::optional<typename T::connection> conn;
};

// Accepts on `r` (running `receiver_io`) while `t` (running `sender_io`) connects as `who`.
template <class T>
handshake<T> connect(asio::io_context& sender_io, asio::io_context& receiver_io, T& t,
                     typename T::receiver& r, sl::sender_identity who = {}) {
  handshake<T> h;
  bool accepted = false, connected = false;
  r.async_accept([&](std::error_code ec, std::uint32_t sender) {
    h.accept_ec = ec;
    h.sender = sender;
    accepted = true;
  });
  t.async_connect(r.local_endpoint(), who, [&](std::error_code ec, typename T::connection c) {
    h.connect_ec = ec;
    if (!ec) h.conn.emplace(std::move(c));
    connected = true;
  });
  if (&sender_io == &receiver_io)
    REQUIRE(run_until(sender_io, [&] { return accepted && connected; }));
  else
    REQUIRE(run_until({&sender_io, &receiver_io}, [&] { return accepted && connected; }));
  return h;
}

template <class T>
handshake<T> connect(asio::io_context& io, T& t, typename T::receiver& r, sl::sender_identity who = {}) {
  return connect(io, io, t, r, who);
}

// A receiver with one arena and `regions` equal regions, a sender connected to it.
template <sv::poll_mode Mode = sv::poll_mode::adaptive>
struct pair {
  using transport_type = sv::basic_verbs_transport<Mode, asio::io_context::executor_type>;
  explicit pair(sv::options o = {}, std::size_t region_bytes = 1 << 20, std::size_t regions = 4,
                sl::sender_identity who = {})
      : t(io.get_executor(), keyed(std::move(o))), r(t, listen_endpoint()) {
    arena = r.allocate(region_bytes * regions);
    for (std::size_t i = 0; i < regions; ++i)
      r.expose("layer" + std::to_string(i) + ".weight",
               arena.subspan(i * region_bytes, region_bytes));
    staging.resize(region_bytes * regions);
    reg = t.register_memory(staging);
    auto h = connect(io, t, r, who);
    REQUIRE_FALSE(h.accept_ec);
    REQUIRE_FALSE(h.connect_ec);
    CHECK(h.sender == who.sender);
    conn = std::move(h.conn);
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

}  // namespace verbs_test
