// What the pipeline tests' loaders write: a byte pattern that differs per tensor, version
// and position, so a byte in the wrong place or from the wrong version is caught.
#pragma once

#include <shardline/pipeline.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

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

}  // namespace shardline::testing
