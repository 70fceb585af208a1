// shardline/verbs/detail/wire.hpp: the control connection's messages.
// hello (sender -> receiver): "SLV1" u32 qps, gid[16], qps x (u32 qp_num, u32 psn)
// reply (receiver -> sender): the same for the receiver's QPs, then u64 n + n bytes of
// the receiver's serialized region_table. Little-endian.
#pragma once

#include <shardline/verbs/queue_pair.hpp>

#include <infiniband/verbs.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace shardline::verbs::detail {

inline constexpr std::size_t wire_fixed = 4 + 4 + 16;
inline constexpr std::size_t wire_max_qps = 64;
inline constexpr std::uint64_t wire_max_table = 64u << 20;

inline void put_u32(std::string& s, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
inline void put_u64(std::string& s, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
inline std::uint64_t get_le(const char* p, int n) {
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= std::uint64_t(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

inline std::string encode_endpoints(const ibv_gid& gid, const std::vector<qp_endpoint>& qps) {
  std::string s = "SLV1";
  put_u32(s, static_cast<std::uint32_t>(qps.size()));
  s.append(reinterpret_cast<const char*>(gid.raw), 16);
  for (auto& q : qps) {
    put_u32(s, q.qp_num);
    put_u32(s, q.psn);
  }
  return s;
}

/// Parses the fixed part; returns the QP count, 0 when malformed.
inline std::size_t decode_fixed(std::string_view b, ibv_gid& gid) {
  if (b.size() < wire_fixed || b.substr(0, 4) != "SLV1") return 0;
  const auto n = get_le(b.data() + 4, 4);
  if (n == 0 || n > wire_max_qps) return 0;
  std::memcpy(gid.raw, b.data() + 8, 16);
  return static_cast<std::size_t>(n);
}

inline std::vector<qp_endpoint> decode_qps(std::string_view b, std::size_t n) {
  std::vector<qp_endpoint> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    v[i].qp_num = static_cast<std::uint32_t>(get_le(b.data() + 8 * i, 4));
    v[i].psn = static_cast<std::uint32_t>(get_le(b.data() + 8 * i + 4, 4));
  }
  return v;
}

}  // namespace shardline::verbs::detail
