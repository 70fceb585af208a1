// shardline/memory.hpp: descriptors of local and remote memory, and the serialisable
// table a receiver sends to its sender.
#pragma once

#include <shardline/error.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace shardline {

/// Local memory a transport may read from: the sender's staging arena, registered once.
/// `key` is the transport's local key (an ibv_mr lkey for verbs, 0 where unused).
struct local_region {
  std::byte* data = nullptr;
  std::size_t size = 0;
  std::uint32_t key = 0;

  std::span<std::byte> bytes() const noexcept { return {data, size}; }
  bool contains(const std::byte* p, std::size_t n) const noexcept {
    return p >= data && n <= size && static_cast<std::size_t>(p - data) <= size - n;
  }
};

/// The registration of transports whose copies read the sender's memory in place
/// (loopback, shm): nothing to register or release, only the region to remember.
class unregistered_memory {
public:
  explicit unregistered_memory(std::span<std::byte> bytes) noexcept
      : region_{bytes.data(), bytes.size(), 0} {}
  local_region region() const noexcept { return region_; }

private:
  local_region region_;
};

/// Memory a receiver exposed to its peer: address in the receiver's address space
/// (or offset in its shared arena, per transport), length and remote key.
/// Local and remote memory are distinct types on purpose: one is never passed for the other.
struct remote_region {
  std::string name;
  std::uint64_t address = 0;
  std::uint64_t length = 0;
  std::uint32_t key = 0;

  bool contains(std::uint64_t addr, std::uint64_t n) const noexcept {
    return addr >= address && n <= length && addr - address <= length - n;
  }
  friend bool operator==(const remote_region&, const remote_region&) = default;
};

/// The receiver's exposed regions, as the sender sees them after connecting.
class region_table {
public:
  region_table() = default;
  explicit region_table(std::vector<remote_region> regions) : regions_(std::move(regions)) {}

  void add(remote_region r) { regions_.push_back(std::move(r)); }
  const std::vector<remote_region>& regions() const noexcept { return regions_; }
  bool empty() const noexcept { return regions_.empty(); }
  std::size_t size() const noexcept { return regions_.size(); }

  /// The region with this name, or nullptr.
  const remote_region* find(std::string_view name) const noexcept {
    for (const auto& r : regions_)
      if (r.name == name) return &r;
    return nullptr;
  }

  /// The region holding all of [address, address + length), or nullptr.
  const remote_region* find(std::uint64_t address, std::uint64_t length) const noexcept {
    for (const auto& r : regions_)
      if (r.contains(address, length)) return &r;
    return nullptr;
  }

  /// Little-endian, length-prefixed encoding; the same bytes on every host.
  std::string serialize() const {
    std::string out = "SLRT";
    put(out, static_cast<std::uint64_t>(regions_.size()));
    for (const auto& r : regions_) {
      put(out, static_cast<std::uint64_t>(r.name.size()));
      out += r.name;
      put(out, r.address);
      put(out, r.length);
      put(out, static_cast<std::uint64_t>(r.key));
    }
    return out;
  }

  static region_table parse(std::string_view bytes, std::error_code& ec) {
    ec = make_error_code(errc::protocol_error);
    region_table t;
    if (bytes.substr(0, 4) != "SLRT") return t;
    bytes.remove_prefix(4);
    std::uint64_t count = 0;
    if (!get(bytes, count) || count > bytes.size()) return t;
    for (std::uint64_t i = 0; i < count; ++i) {
      remote_region r;
      std::uint64_t name_len = 0, key = 0;
      if (!get(bytes, name_len) || name_len > bytes.size()) return {};
      r.name.assign(bytes.substr(0, name_len));
      bytes.remove_prefix(name_len);
      if (!get(bytes, r.address) || !get(bytes, r.length) || !get(bytes, key) || key > UINT32_MAX)
        return {};
      r.key = static_cast<std::uint32_t>(key);
      t.add(std::move(r));
    }
    if (!bytes.empty()) return {};
    ec.clear();
    return t;
  }

  static region_table parse(std::string_view bytes) {
    std::error_code ec;
    auto t = parse(bytes, ec);
    throw_if(ec, "region table: malformed descriptor");
    return t;
  }

private:
  static void put(std::string& out, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  static bool get(std::string_view& in, std::uint64_t& v) {
    if (in.size() < 8) return false;
    v = 0;
    for (int i = 0; i < 8; ++i) v |= std::uint64_t(static_cast<unsigned char>(in[i])) << (8 * i);
    in.remove_prefix(8);
    return true;
  }

  std::vector<remote_region> regions_;
};

/// One one-sided write: `source` (inside a registered local region with key
/// `source_key`) lands at `remote_address` under `remote_key`.
struct write_request {
  std::span<const std::byte> source;
  std::uint32_t source_key = 0;
  std::uint64_t remote_address = 0;
  std::uint32_t remote_key = 0;
};

/// A write of `source` to `offset` bytes into `region`.
inline write_request make_write(const local_region& local, std::span<const std::byte> source,
                                const remote_region& region, std::uint64_t offset = 0) {
  return {source, local.key, region.address + offset, region.key};
}

}  // namespace shardline
