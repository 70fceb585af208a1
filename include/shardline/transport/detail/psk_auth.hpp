// shardline/transport/detail/psk_auth.hpp: the pre-shared key of network control channels
// and the mutual challenge-response that proves it, run by the handshake between the hello
// and the verdict (transport/detail/handshake.hpp):
//   receiver -> sender: challenge  "SLAU" nonce_r[32]
//   sender -> receiver: proof      nonce_s[32] mac_s[32]
//   receiver -> sender: answer     u32 status (0, or errc::authentication_failed) mac_r[32]
// mac = HMAC-SHA-512/256(key, label, role, magic, hello, nonce_r, nonce_s) (libsodium's
// crypto_auth): both nonces make a MAC good for one connection only, the role keeps a MAC of
// one side from passing for the other's, the hello and magic bind what the sender claimed
// and which transport it speaks. The receiver proves itself only after the sender did: a peer
// without the key learns nothing but a random challenge and a failed status.
// "SLAU" read as a little-endian u32 is far above any verdict status, so a sender can tell a
// challenge from the verdict of a receiver that does not authenticate.
// Once both proved the key, each side derives the connection's session key
//   session = HMAC-SHA-512/256(key, "shardline session v1", nonce_r, nonce_s, magic)
// and every notice and every ack after the handshake travels sealed (notice_seal, below):
//   frame[8] tag[16], tag = HMAC-SHA-512/256(session, direction, u64 sequence, frame)[0, 16)
// The sequence number counts each direction's frames from 0 and is never sent: a frame
// replayed, reordered, dropped or sent the other way fails its tag. A tag is truncated to
// 16 bytes: a forger gets one guess per connection (a tag that fails ends the connection, and
// the next connection has another session key), so 2^-128 per guess is all a longer tag buys.
// This does not encrypt anything, nor sign the QP and region exchange of the handshake.
#pragma once

#include <shardline/detail/codec.hpp>
#include <shardline/error.hpp>
#include <shardline/transport/detail/control.hpp>

#include <sodium.h>

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace shardline {

namespace detail {
class psk_session;

/// libsodium is initialised once per process, before any key or nonce is made.
inline void require_sodium() {
  static const bool ready = sodium_init() >= 0;
  if (!ready)
    throw error(std::make_error_code(std::errc::not_supported), "shared key: libsodium failed to initialise");
}
}  // namespace detail

/// The pre-shared key of a network transport's control channel: 32 secret bytes that both
/// the sender and the receiver hold. A connection is admitted only once each side proved it
/// holds the same key (transport/detail/psk_auth.hpp).
///
/// Never printed: no operator<<, and no error message carries it. Each copy is zeroed
/// (sodium_memzero) when destroyed. Copyable, so that options holding it stay copyable.
class shared_key {
public:
  static constexpr std::size_t size = crypto_auth_hmacsha512256_KEYBYTES;
  /// What the handshake (transport/detail/handshake.hpp) runs to prove this key.
  using proof = detail::psk_session;

  /// A fresh random key (e.g. one per run, handed to child processes with hex()).
  static shared_key generate() {
    detail::require_sodium();
    shared_key k;
    crypto_auth_hmacsha512256_keygen(k.bytes_.data());
    return k;
  }

  /// Exactly `size` bytes. Throws shardline::error(errc::invalid_argument) for another count.
  static shared_key from_bytes(std::span<const std::byte> bytes) {
    if (bytes.size() != size)
      throw error(make_error_code(errc::invalid_argument), "shared key: " + std::to_string(bytes.size()) +
                                                               " bytes given; a key is exactly " +
                                                               std::to_string(size) + " bytes");
    shared_key k;
    std::memcpy(k.bytes_.data(), bytes.data(), size);
    return k;
  }

  /// 64 hexadecimal digits (surrounding whitespace ignored). Throws
  /// shardline::error(errc::invalid_argument) naming `source` (never the text) otherwise.
  static shared_key from_hex(std::string_view hex, std::string_view source = "shared key") {
    detail::require_sodium();
    while (!hex.empty() && is_space(hex.front())) hex.remove_prefix(1);
    while (!hex.empty() && is_space(hex.back())) hex.remove_suffix(1);
    shared_key k;
    std::size_t n = 0;
    const char* end = nullptr;
    if (hex.size() != 2 * size ||
        sodium_hex2bin(k.bytes_.data(), size, hex.data(), hex.size(), nullptr, &n, &end) != 0 || n != size ||
        end != hex.data() + hex.size())
      throw error(make_error_code(errc::invalid_argument),
                  std::string(source) + " is not a key: a key is " + std::to_string(2 * size) +
                      " hexadecimal digits (" + std::to_string(size) + " bytes)");
    return k;
  }

  /// The key in the environment variable `name`, as 64 hexadecimal digits. Throws
  /// shardline::error(errc::invalid_argument) naming the variable when it is unset or not a key.
  static shared_key from_environment(const char* name) {
    const char* v = std::getenv(name);
    const std::string source = "shared key: environment variable " + std::string(name);
    if (!v || !*v) throw error(make_error_code(errc::invalid_argument), source + " is not set");
    return from_hex(v, source);
  }

  /// The key in the file at `path`: `size` raw bytes, or 64 hexadecimal digits. The file
  /// must be accessible to its owner only (mode 0600 or 0400), as an ssh private key. Throws
  /// shardline::error naming the path: the errno when it cannot be read,
  /// errc::invalid_argument when others may read it or it holds no key.
  static shared_key from_file(const std::string& path) {
    detail::require_sodium();
    const std::string source = "shared key file '" + path + "'";
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) {
      const std::error_code ec(errno, std::system_category());
      throw error(ec, source + " cannot be opened: " + ec.message());
    }
    struct stat st {};
    std::array<char, 2 * size + 2> text{};  // room for a hex key, a newline, and one byte too many
    std::size_t n = 0;
    const bool stated = ::fstat(fileno(f), &st) == 0;
    if (stated) n = std::fread(text.data(), 1, text.size(), f);
    const bool failed = !stated || std::ferror(f);
    const int saved = errno;
    std::fclose(f);
    if (failed) {
      const std::error_code ec(saved, std::system_category());
      sodium_memzero(text.data(), text.size());
      throw error(ec, source + " cannot be read: " + ec.message());
    }
    if ((st.st_mode & 077) != 0) {
      sodium_memzero(text.data(), text.size());
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      throw error(make_error_code(errc::invalid_argument),
                  source + " may be read by others (mode " + mode + "): make it 0600");
    }
    struct wipe {
      std::array<char, 2 * size + 2>& t;
      ~wipe() { sodium_memzero(t.data(), t.size()); }
    } wiped{text};
    if (n == size) return from_bytes(std::as_bytes(std::span(text.data(), n)));
    return from_hex(std::string_view(text.data(), n), source);
  }

  shared_key(const shared_key&) = default;
  shared_key& operator=(const shared_key&) = default;
  ~shared_key() { sodium_memzero(bytes_.data(), bytes_.size()); }

  /// The key as 64 hexadecimal digits, for handing it to a process that reads it back with
  /// from_hex or from_environment. Never log it.
  std::string hex() const {
    detail::require_sodium();
    std::string s(2 * size + 1, '\0');
    sodium_bin2hex(s.data(), s.size(), bytes_.data(), size);
    s.pop_back();
    return s;
  }

  /// The secret bytes, for the MAC.
  std::span<const unsigned char, size> secret() const noexcept { return bytes_; }

private:
  shared_key() = default;
  static bool is_space(char c) noexcept { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
  std::array<unsigned char, size> bytes_{};
};

}  // namespace shardline

namespace shardline::detail {

inline constexpr std::size_t psk_nonce_bytes = 32;
inline constexpr std::size_t psk_mac_bytes = crypto_auth_hmacsha512256_BYTES;
inline constexpr std::string_view psk_challenge_tag = "SLAU";
inline constexpr std::size_t psk_challenge_bytes = 4 + psk_nonce_bytes;
inline constexpr std::size_t psk_proof_bytes = psk_nonce_bytes + psk_mac_bytes;
inline constexpr std::size_t psk_answer_bytes = 4 + psk_mac_bytes;
static_assert(psk_mac_bytes == 32);

class session_key;

/// Which side a MAC speaks for: a sender's MAC never passes for a receiver's.
enum class psk_role : unsigned char { sender = 'S', receiver = 'R' };

/// One connection's challenge-response: the key, both nonces, the frames in flight. Lives in
/// the handshake's state (a stable address while its reads and writes are pending).
class psk_session {
public:
  static constexpr bool proves_key = true;

  explicit psk_session(shared_key key) : key_(std::move(key)) { require_sodium(); }
  psk_session(const psk_session&) = delete;
  psk_session& operator=(const psk_session&) = delete;
  ~psk_session() {
    sodium_memzero(proof.data(), proof.size());
    sodium_memzero(answer.data(), answer.size());
  }

  std::array<std::byte, psk_challenge_bytes> challenge{};
  std::array<std::byte, psk_proof_bytes> proof{};
  std::array<std::byte, psk_answer_bytes> answer{};

  // ---- the receiver

  /// A fresh challenge in `challenge`.
  void make_challenge() {
    std::memcpy(challenge.data(), psk_challenge_tag.data(), 4);
    randombytes_buf(challenge.data() + 4, psk_nonce_bytes);
  }

  /// Checks the sender's `proof` against the challenge and `hello` as received, and fills
  /// `answer`: our own MAC when the proof holds, a failed status (and no MAC) otherwise.
  /// errc::authentication_failed when it does not hold.
  std::error_code check_proof(std::string_view magic, const hello_frame& hello) {
    const auto* nonce_s = proof.data();
    const auto expected = mac(psk_role::sender, magic, hello, nonce_s);
    answer.fill(std::byte{0});
    if (crypto_verify_32(reinterpret_cast<const unsigned char*>(proof.data() + psk_nonce_bytes),
                         expected.data()) != 0) {
      put_status(errc::authentication_failed);
      return make_error_code(errc::authentication_failed);
    }
    const auto ours = mac(psk_role::receiver, magic, hello, nonce_s);
    std::memcpy(answer.data() + 4, ours.data(), ours.size());
    return {};
  }

  // ---- the sender

  /// Whether the first 4 bytes a sender reads after its hello open a challenge.
  static bool opens_challenge(const std::array<std::byte, 4>& lead) noexcept {
    return std::memcmp(lead.data(), psk_challenge_tag.data(), 4) == 0;
  }

  /// Answers `challenge` (read whole) with a fresh nonce and our MAC in `proof`.
  void make_proof(std::string_view magic, const hello_frame& hello) {
    randombytes_buf(proof.data(), psk_nonce_bytes);
    const auto ours = mac(psk_role::sender, magic, hello, proof.data());
    std::memcpy(proof.data() + psk_nonce_bytes, ours.data(), ours.size());
  }

  /// Checks the receiver's `answer`: errc::authentication_failed for its refusal of our
  /// proof or a MAC that is not the receiver's over this connection, errc::protocol_error
  /// for a status that is neither.
  std::error_code check_answer(std::string_view magic, const hello_frame& hello) const {
    const auto status = get_le<std::uint32_t>(answer.data());
    if (status == static_cast<std::uint32_t>(errc::authentication_failed))
      return make_error_code(errc::authentication_failed);
    if (status != 0) return make_error_code(errc::protocol_error);
    const auto expected = mac(psk_role::receiver, magic, hello, proof.data());
    if (crypto_verify_32(reinterpret_cast<const unsigned char*>(answer.data() + 4), expected.data()) != 0)
      return make_error_code(errc::authentication_failed);
    return {};
  }

  /// The connection's session key (notice_seal): call once both proofs held.
  session_key derive_session_key(std::string_view magic) const;

  /// The MAC `role` proves itself with on this connection (its challenge and the sender's
  /// nonce at `nonce_s`); public so that tests can forge the exact frames a peer would send.
  std::array<unsigned char, psk_mac_bytes> mac(psk_role role, std::string_view magic, const hello_frame& hello,
                                               const std::byte* nonce_s) const {
    static constexpr std::string_view label = "shardline psk v1";
    std::array<unsigned char, 4> dialect{};
    std::memcpy(dialect.data(), magic.data(), std::min<std::size_t>(magic.size(), dialect.size()));
    const auto r = static_cast<unsigned char>(role);
    crypto_auth_hmacsha512256_state st;
    crypto_auth_hmacsha512256_init(&st, key_.secret().data(), shared_key::size);
    crypto_auth_hmacsha512256_update(&st, reinterpret_cast<const unsigned char*>(label.data()), label.size());
    crypto_auth_hmacsha512256_update(&st, &r, 1);
    crypto_auth_hmacsha512256_update(&st, dialect.data(), dialect.size());
    crypto_auth_hmacsha512256_update(&st, reinterpret_cast<const unsigned char*>(hello.data()), hello.size());
    crypto_auth_hmacsha512256_update(&st, reinterpret_cast<const unsigned char*>(challenge.data() + 4),
                                     psk_nonce_bytes);
    crypto_auth_hmacsha512256_update(&st, reinterpret_cast<const unsigned char*>(nonce_s), psk_nonce_bytes);
    std::array<unsigned char, psk_mac_bytes> out{};
    crypto_auth_hmacsha512256_final(&st, out.data());
    sodium_memzero(&st, sizeof st);
    return out;
  }

private:
  void put_status(errc e) {
    std::string s;
    put_le<std::uint32_t>(s, static_cast<std::uint32_t>(e));
    std::memcpy(answer.data(), s.data(), 4);
  }

  shared_key key_;
};

/// One connection's session key: derived from the pre-shared key and both handshake nonces,
/// so no two connections share one. Move-only; zeroed (sodium_memzero) when destroyed.
class session_key {
public:
  static constexpr std::size_t size = crypto_auth_hmacsha512256_KEYBYTES;

  explicit session_key(std::span<const unsigned char, size> bytes) noexcept {
    std::memcpy(bytes_.data(), bytes.data(), size);
  }
  session_key(session_key&& o) noexcept : bytes_(o.bytes_) { sodium_memzero(o.bytes_.data(), size); }
  session_key& operator=(session_key&& o) noexcept {
    if (this != &o) {
      bytes_ = o.bytes_;
      sodium_memzero(o.bytes_.data(), size);
    }
    return *this;
  }
  session_key(const session_key&) = delete;
  session_key& operator=(const session_key&) = delete;
  ~session_key() { sodium_memzero(bytes_.data(), size); }

  std::span<const unsigned char, size> secret() const noexcept { return bytes_; }

private:
  std::array<unsigned char, size> bytes_{};
};

static_assert(session_key::size == psk_mac_bytes);

inline session_key psk_session::derive_session_key(std::string_view magic) const {
  static constexpr std::string_view label = "shardline session v1";
  std::array<unsigned char, 4> dialect{};
  std::memcpy(dialect.data(), magic.data(), std::min<std::size_t>(magic.size(), dialect.size()));
  crypto_auth_hmacsha512256_state st;
  crypto_auth_hmacsha512256_init(&st, key_.secret().data(), shared_key::size);
  crypto_auth_hmacsha512256_update(&st, reinterpret_cast<const unsigned char*>(label.data()), label.size());
  crypto_auth_hmacsha512256_update(&st, reinterpret_cast<const unsigned char*>(challenge.data() + 4),
                                   psk_nonce_bytes);
  crypto_auth_hmacsha512256_update(&st, reinterpret_cast<const unsigned char*>(proof.data()), psk_nonce_bytes);
  crypto_auth_hmacsha512256_update(&st, dialect.data(), dialect.size());
  std::array<unsigned char, psk_mac_bytes> out{};
  crypto_auth_hmacsha512256_final(&st, out.data());
  sodium_memzero(&st, sizeof st);
  session_key k(out);
  sodium_memzero(out.data(), out.size());
  return k;
}

/// Which way a sealed frame goes: a notice's tag never passes for an ack's.
enum class seal_direction : unsigned char { notice = 'N', ack = 'A' };

inline constexpr std::size_t seal_tag_bytes = 16;

/// The seal policy of the control link (transport/detail/control_link.hpp) for network
/// transports: with a session key, every frame goes out with its tag and every frame read
/// must carry the tag of the next frame expected that way; without one (a transport run
/// unauthenticated) frames go bare, as with no_seal. One per connection end: a sender's
/// notice_link seals notices and opens acks, a receiver's peer the other way round.
class notice_seal {
public:
  static constexpr bool seals = true;

  notice_seal() = default;  // unkeyed: no tags
  notice_seal(session_key key, seal_direction sends)
      : key_(std::make_unique<session_key>(std::move(key))), sends_(sends),
        reads_(sends == seal_direction::notice ? seal_direction::ack : seal_direction::notice) {}

  bool keyed() const noexcept { return key_ != nullptr; }

  /// How many tag bytes follow each frame on the wire: seal_tag_bytes, or 0 unkeyed.
  std::size_t tag_size() const noexcept { return keyed() ? seal_tag_bytes : 0; }

  /// The tag of `frame` as the next frame sent, in the seal's own buffer (good until the next
  /// seal()); empty unkeyed.
  std::span<const std::byte> seal(const notice_frame& frame) {
    if (!keyed()) return {};
    const auto t = tag(sends_, sent_++, frame);
    std::memcpy(out_.data(), t.data(), seal_tag_bytes);
    return std::span<const std::byte>(out_.data(), seal_tag_bytes);
  }

  /// Where the tag of the next frame read lands (tag_size() bytes).
  std::span<std::byte> in_tag() noexcept { return std::span<std::byte>(in_.data(), tag_size()); }

  /// Whether `frame`, with in_tag(), is the next frame expected; compared in constant time.
  /// Always true unkeyed.
  bool open(const notice_frame& frame) {
    if (!keyed()) return true;
    const auto t = tag(reads_, read_++, frame);
    return crypto_verify_16(t.data(), reinterpret_cast<const unsigned char*>(in_.data())) == 0;
  }

  /// The full MAC of `frame` as frame number `sequence` going `way` under `key` (the tag is
  /// its first seal_tag_bytes); public so that tests can forge exact frames.
  static std::array<unsigned char, psk_mac_bytes> tag(const session_key& key, seal_direction way,
                                                      std::uint64_t sequence, const notice_frame& frame) {
    std::array<unsigned char, 1 + 8 + notice_bytes> msg{};
    msg[0] = static_cast<unsigned char>(way);
    for (int i = 0; i < 8; ++i) msg[1 + i] = static_cast<unsigned char>(sequence >> (8 * i));
    std::memcpy(msg.data() + 9, frame.data(), notice_bytes);
    std::array<unsigned char, psk_mac_bytes> out{};
    crypto_auth_hmacsha512256(out.data(), msg.data(), msg.size(), key.secret().data());
    return out;
  }

private:
  std::array<unsigned char, psk_mac_bytes> tag(seal_direction way, std::uint64_t sequence,
                                               const notice_frame& frame) const {
    return tag(*key_, way, sequence, frame);
  }

  std::unique_ptr<session_key> key_;  // null: unkeyed
  seal_direction sends_ = seal_direction::notice;
  seal_direction reads_ = seal_direction::ack;
  std::uint64_t sent_ = 0;
  std::uint64_t read_ = 0;
  std::array<std::byte, seal_tag_bytes> out_{};
  std::array<std::byte, seal_tag_bytes> in_{};
};

}  // namespace shardline::detail
