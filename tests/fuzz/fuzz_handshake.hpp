// What the two handshake targets share: the key both sides hold, the judge and exchange a
// receiver's handshake is given, and the outcome one handshake must have.
#pragma once

#include <shardline/transport/detail/handshake.hpp>
#include <shardline/transport/detail/psk_auth.hpp>

#include "fuzz_peer.hpp"

#include <cstring>
#include <optional>

namespace fuzz {

namespace sl = shardline;
namespace sd = shardline::detail;

inline const sl::shared_key& the_key() {
  static const sl::shared_key k = [] {
    std::array<std::byte, sl::shared_key::size> b{};
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = std::byte(0x5a ^ i);
    return sl::shared_key::from_bytes(b);
  }();
  return k;
}

inline sd::hello_frame hello_of(std::string_view bytes) {
  sd::hello_frame f{};
  std::memcpy(f.data(), bytes.data(), std::min(f.size(), bytes.size()));
  return f;
}

/// How a handshake ended: its code and, for a receiver, the identity it reported.
struct outcome {
  int completions = 0;
  std::error_code ec;
  sl::sender_identity who;
};

/// A handshake must end, once, and never by its deadline: every peer here hangs up.
inline void check_ended(const outcome& o) {
  FUZZ_CHECK(o.completions == 1);
  FUZZ_CHECK(o.ec != asio::error::timed_out);
  FUZZ_CHECK(o.ec != asio::error::operation_aborted);
}

inline bool same(const sl::sender_identity& a, const sl::sender_identity& b) {
  return a.sender == b.sender && a.plan_fingerprint == b.plan_fingerprint;
}

/// Bytes a transport's own exchange reads after an admitted handshake.
inline constexpr std::size_t exchange_bytes = 4;

}  // namespace fuzz
