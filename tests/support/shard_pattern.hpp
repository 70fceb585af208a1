// What the pipeline tests' loaders write: a byte pattern that differs per tensor, version
// and position, so a byte in the wrong place or from the wrong version is caught.
#pragma once

#include <shardline/pipeline.hpp>

#include <shardline/plan/transfer_plan.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace shardline::testing {

inline std::byte pattern(const std::string& tensor, std::uint32_t version, std::size_t i) {
  std::uint32_t h = 2166136261u ^ version;
  for (unsigned char c : tensor) h = (h ^ c) * 16777619u;
  return static_cast<std::byte>((h + i * 131) >> 3);
}

/// A loader: the bytes a trainer would produce for the shard's tensor.
inline void fill(const shard_load& load) {
  for (std::size_t i = 0; i < load.staging.size(); ++i)
    load.staging[i] = pattern(load.tensor.name, load.version, i);
}

/// What receiver `r` of `plan` (a full plan) must hold in parameter `exposed` after
/// `version`, derived from the plan's writes and the pattern, independently of any pipeline.
/// Empty when the plan has no such parameter.
inline std::vector<std::byte> expected_bytes(const transfer_plan& plan, std::size_t r,
                                             const parameter_descriptor& exposed, std::uint32_t version) {
  const auto* p = plan.find(exposed.name);
  if (!p) return {};
  std::vector<std::byte> full(p->parameter.destination.bytes());
  for (const auto& s : p->parameter.shards)
    for (std::size_t i = 0; i < s.tensor.bytes(); ++i) full[s.offset + i] = pattern(s.tensor.name, version, i);
  std::vector<std::byte> mine(exposed.bytes());
  for (const auto& w : p->writes)
    if (w.receiver == r) std::memcpy(mine.data() + w.destination_offset, full.data() + w.staging_offset, w.bytes);
  return mine;
}

}  // namespace shardline::testing
