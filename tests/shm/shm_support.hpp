// What the shm suites (test_shm_transport.cpp, test_shm_hostile.cpp) share: patterned bytes,
// a hang-guarded io_context loop, completion outcomes kept in shared storage, and a raw send
// for hand-made peers.
#pragma once

#include <asio/io_context.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <system_error>
#include <tuple>
#include <vector>

#include <sys/socket.h>
#include <sys/types.h>

namespace shm_test {

inline std::byte pattern(std::size_t i, unsigned seed) {
  return static_cast<std::byte>((i * 131 + seed * 7 + (i >> 12)) & 0xff);
}

inline std::vector<std::byte> patterned(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = pattern(i, seed);
  return v;
}

inline bool holds_pattern(std::span<const std::byte> s, unsigned seed) {
  for (std::size_t i = 0; i < s.size(); ++i)
    if (s[i] != pattern(i, seed)) return false;
  return true;
}

/// Runs handlers until `done()` or the timeout: no test can hang on a lost completion.
template <class Pred>
bool run_until(asio::io_context& io, Pred done,
               std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    if (io.stopped()) io.restart();
    io.run_one_for(std::chrono::milliseconds(10));
  }
  return done();
}

/// The arguments of one completion, kept in shared storage so that a handler still pending
/// when a hang guard gives up never writes into a dead stack frame.
template <class... T>
struct outcome {
  std::shared_ptr<std::optional<std::tuple<T...>>> value = std::make_shared<std::optional<std::tuple<T...>>>();
  auto handler() {
    return [v = value](T... args) { v->emplace(std::move(args)...); };
  }
  bool ready() const { return value->has_value(); }
  std::tuple<T...>& get() { return **value; }
  std::error_code code() const { return std::get<0>(**value); }
};

/// All of `bytes` on a raw socket (no SIGPIPE), or false.
inline bool raw_send(int fd, std::span<const std::byte> bytes) {
  return ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
}

}  // namespace shm_test
