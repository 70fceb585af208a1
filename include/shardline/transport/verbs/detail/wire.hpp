// shardline/transport/verbs/detail/wire.hpp: the QP exchange on the control connection, after the
// sender's hello (transport/detail/control.hpp, magic "SLVB") was admitted by the receiver's verdict:
//   sender -> receiver: "SLVQ" u32 qps, gid[16], qps x (u32 qp_num, u32 psn)
//   receiver -> sender: the same for the receiver's QPs, then u64 n + n bytes of the
//                       receiver's serialized region_table, then its window keys:
//                       "SLVK" u32 rows, u32 qps, rows x (u32 key, qps x u32 rkey).
// Then, for the connection's life: notice frames (sender -> receiver), each acknowledged by
// its echo (transport/detail/control.hpp). Little-endian, through detail/codec.hpp.
#pragma once

#include <shardline/detail/codec.hpp>
#include <shardline/error.hpp>
#include <shardline/transport/verbs/queue_pair.hpp>

#include <infiniband/verbs.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace shardline::verbs::detail {

/// The hello's magic (shardline::detail::encode_hello).
inline constexpr std::string_view hello_magic = "SLVB";
inline constexpr std::size_t wire_fixed = 4 + 4 + 16;
// Defaults of options::max_queue_pairs and options::max_table_bytes (the limits checked are
// the options').
inline constexpr std::size_t wire_max_qps = 64;
inline constexpr std::uint64_t wire_max_table = 64u << 20;

inline std::string encode_endpoints(const ibv_gid& gid, const std::vector<qp_endpoint>& qps) {
  std::string s = "SLVQ";
  shardline::detail::put_le<std::uint32_t>(s, static_cast<std::uint32_t>(qps.size()));
  s.append(reinterpret_cast<const char*>(gid.raw), 16);
  for (auto& q : qps) {
    shardline::detail::put_le<std::uint32_t>(s, q.qp_num);
    shardline::detail::put_le<std::uint32_t>(s, q.psn);
  }
  return s;
}

/// Parses the fixed part; returns the QP count, 0 when malformed.
inline std::size_t decode_fixed(std::string_view b, ibv_gid& gid, std::size_t max_qps = wire_max_qps) {
  shardline::detail::wire_reader in(b.substr(0, wire_fixed));
  std::uint32_t n = 0;
  if (!in.expect("SLVQ") || !in.read(n) || in.remaining() != 16 || n == 0 || n > max_qps)
    return 0;
  std::memcpy(gid.raw, b.data() + 8, 16);
  return n;
}

/// The `n` endpoints at the front of `b` (which holds at least 8 * n bytes).
inline std::vector<qp_endpoint> decode_qps(std::string_view b, std::size_t n) {
  shardline::detail::wire_reader in(b);
  std::vector<qp_endpoint> v(n);
  for (auto& q : v) {
    in.read(q.qp_num);
    in.read(q.psn);
  }
  return v;
}

// ---- window keys: a write under the table's `key` carries, on QP q, its row's q-th rkey (a
// memory window bound to the receiver's QP q for this sender alone). No rows: no windows, the
// table's keys are the rkeys on every QP.

inline constexpr std::size_t keys_fixed = 4 + 4 + 4;
inline constexpr std::uint32_t wire_max_key_rows = 1u << 20;

/// `rows` holds (1 + qps) words per row: the key, then one rkey per QP.
inline std::string encode_window_keys(std::size_t qps, const std::vector<std::uint32_t>& rows) {
  std::string s = "SLVK";
  shardline::detail::put_le<std::uint32_t>(s, static_cast<std::uint32_t>(rows.size() / (1 + qps)));
  shardline::detail::put_le<std::uint32_t>(s, static_cast<std::uint32_t>(qps));
  for (auto k : rows) shardline::detail::put_le<std::uint32_t>(s, k);
  return s;
}

/// The row count of the fixed part, checked against the connection's QP count; false when
/// malformed.
inline bool decode_keys_fixed(std::string_view b, std::size_t qps, std::size_t& rows) {
  shardline::detail::wire_reader in(b.substr(0, keys_fixed));
  std::uint32_t n = 0, q = 0;
  if (!in.expect("SLVK") || !in.read(n) || !in.read(q) || q != qps || n > wire_max_key_rows) return false;
  rows = n;
  return true;
}

/// The words at the front of `b` (which holds at least 4 * `words` bytes).
inline std::vector<std::uint32_t> decode_key_rows(std::string_view b, std::size_t words) {
  shardline::detail::wire_reader in(b);
  std::vector<std::uint32_t> v(words);
  for (auto& k : v) in.read(k);
  return v;
}

}  // namespace shardline::verbs::detail
