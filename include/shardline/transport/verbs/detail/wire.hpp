// shardline/transport/verbs/detail/wire.hpp: the QP exchange on the control connection, after the
// sender's hello (transport/detail/control.hpp, magic "SLVB") was admitted by the receiver's verdict:
//   sender -> receiver: "SLVQ" u32 qps, gid[16], qps x (u32 qp_num, u32 psn)
//   receiver -> sender: the same for the receiver's QPs, then u64 n + n bytes of the
//                       receiver's serialized region_table.
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
inline std::size_t decode_fixed(std::string_view b, ibv_gid& gid) {
  shardline::detail::wire_reader in(b.substr(0, wire_fixed));
  std::uint32_t n = 0;
  if (!in.expect("SLVQ") || !in.read(n) || in.remaining() != 16 || n == 0 || n > wire_max_qps)
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

}  // namespace shardline::verbs::detail
