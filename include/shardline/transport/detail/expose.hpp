// shardline/transport/detail/expose.hpp: the one rule of every receiver's expose(): the
// memory kind first, then the transport's own key for the bytes (which may refuse them),
// then the table's name and overlap checks; every refusal is a shardline::error that names
// the receiver and the region once.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

namespace shardline::detail {

/// Who exposes: the receiver as messages name it ("shm receiver"), the transport as
/// require_kind() names it ("the shm transport"), and the kinds it can write.
struct exposer {
  std::string_view receiver;
  std::string_view transport;
  memory_kinds kinds;

  /// "shm receiver: region 'w'".
  std::string region(std::string_view name) const {
    return std::string(receiver) + ": region '" + std::string(name) + "'";
  }
};

/// Adds `e` to `table` under the key `key_of(e)` returns (throwing shardline::error naming
/// the region, built with who.region(), when it cannot give one). Throws shardline::error:
/// errc::unsupported_memory for a kind outside who.kinds; errc::invalid_argument for a name
/// given twice or an overlap. `table` is unchanged when it throws.
template <class KeyOf>
void expose_region(region_table& table, exposure e, const exposer& who, KeyOf&& key_of) {
  require_kind(who.kinds, e.location, who.transport, who.region(e.name));
  const std::uint32_t key = std::forward<KeyOf>(key_of)(std::as_const(e));
  try {
    table.add({std::move(e.name), reinterpret_cast<std::uintptr_t>(e.bytes.data()), e.bytes.size(), key,
               e.location, std::move(e.layout)});
  } catch (const error& x) {
    throw error(x.code(), std::string(who.receiver) + ": " + x.what());
  }
}

}  // namespace shardline::detail
