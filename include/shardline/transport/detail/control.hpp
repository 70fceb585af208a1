// The control messages every transport with a control channel (shm's Unix socket, verbs'
// TCP connection) exchanges, in one encoding:
//   hello (sender -> receiver, first):   magic[4] u32 protocol u32 sender u64 fingerprint
//   verdict (receiver -> sender):        u32 status (0: admitted, else a shardline::errc)
//   notice (sender -> receiver):         u8 kind, 3 zero bytes, u32 version
//   ack (receiver -> sender, per notice): the notice's 8 bytes echoed
//   (on a keyed network transport each notice and ack is followed by its 16-byte tag:
//   transport/detail/psk_auth.hpp, notice_seal)
// Little-endian, fixed sizes: nothing here is ever allocated from a length the peer chose.
#pragma once

#include <shardline/detail/codec.hpp>
#include <shardline/error.hpp>
#include <shardline/transport/concepts.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>

namespace shardline::detail {

/// The version of the control protocol; a peer speaking another is refused with
/// errc::protocol_version_mismatch. 3: keyed network transports seal every notice and ack
/// (transport/detail/psk_auth.hpp, notice_seal), so a keyed peer of 2 is refused at its hello
/// instead of failing its first notice.
inline constexpr std::uint32_t control_protocol = 3;

/// How many handshakes a receiver runs at once by default, counting those ended whose result
/// no async_accept took yet (each transport's options: max_pending_handshakes; see
/// handshake_listener in handshake.hpp).
inline constexpr std::size_t default_max_pending_handshakes = 16;

inline constexpr std::size_t hello_bytes = 4 + 4 + 4 + 8;
inline constexpr std::size_t verdict_bytes = 4;
inline constexpr std::size_t notice_bytes = 8;

using hello_frame = std::array<std::byte, hello_bytes>;
using notice_frame = std::array<std::byte, notice_bytes>;

inline hello_frame encode_hello(std::string_view magic, const sender_identity& who) {
  std::string s(magic.substr(0, 4));
  put_le<std::uint32_t>(s, control_protocol);
  put_le<std::uint32_t>(s, who.sender);
  put_le<std::uint64_t>(s, who.plan_fingerprint);
  hello_frame f{};
  std::memcpy(f.data(), s.data(), f.size());
  return f;
}

/// Parses a hello: protocol_error for another magic, protocol_version_mismatch for another
/// protocol version.
inline std::error_code decode_hello(std::string_view magic, const hello_frame& f, sender_identity& who) {
  wire_reader in(std::string_view(reinterpret_cast<const char*>(f.data()), f.size()));
  std::uint32_t protocol = 0;
  if (!in.expect(magic) || !in.read(protocol)) return make_error_code(errc::protocol_error);
  if (protocol != control_protocol) return make_error_code(errc::protocol_version_mismatch);
  in.read(who.sender);
  in.read(who.plan_fingerprint);
  return {};
}

/// The verdict's status: 0 for admitted, otherwise the errc value of the refusal.
inline std::array<std::byte, verdict_bytes> encode_verdict(std::error_code refusal) {
  std::string s;
  put_le<std::uint32_t>(s, refusal ? static_cast<std::uint32_t>(refusal.value()) : 0u);
  std::array<std::byte, verdict_bytes> f{};
  std::memcpy(f.data(), s.data(), f.size());
  return f;
}

/// The refusal a verdict carries, as a shardline::errc; protocol_error for a value that is
/// none of ours.
inline std::error_code decode_verdict(const std::array<std::byte, verdict_bytes>& f) {
  const auto v = get_le<std::uint32_t>(f.data());
  if (v == 0) return {};
  if (v > static_cast<std::uint32_t>(last_errc)) return make_error_code(errc::protocol_error);
  return make_error_code(static_cast<errc>(v));
}

inline notice_frame encode_notice(notice_kind kind, std::uint32_t version) {
  notice_frame f{};
  f[0] = static_cast<std::byte>(kind);
  std::string s;
  put_le<std::uint32_t>(s, version);
  std::memcpy(f.data() + 4, s.data(), 4);
  return f;
}

/// Parses a notice frame from `sender`; protocol_error for an unknown kind or non-zero padding.
inline std::error_code decode_notice(const notice_frame& f, std::uint32_t sender, notice& out) {
  const auto kind = std::to_integer<std::uint8_t>(f[0]);
  if (kind < static_cast<std::uint8_t>(notice_kind::begin) ||
      kind > static_cast<std::uint8_t>(notice_kind::withdraw) || f[1] != std::byte{0} ||
      f[2] != std::byte{0} || f[3] != std::byte{0})
    return make_error_code(errc::protocol_error);
  out = {sender, static_cast<notice_kind>(kind), get_le<std::uint32_t>(f.data() + 4)};
  return {};
}

}  // namespace shardline::detail
