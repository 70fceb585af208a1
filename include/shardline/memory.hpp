// shardline/memory.hpp: where memory lives (its kind and device), descriptors of local and
// remote memory, and the serialisable, indexed table a receiver sends to its senders.
#pragma once

#include <shardline/detail/codec.hpp>
#include <shardline/error.hpp>
#include <shardline/plan/parameter.hpp>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

namespace shardline {

/// What kind of memory a byte range is: pageable host memory, page-locked (pinned) host
/// memory, or memory of one CUDA device.
enum class memory_kind : std::uint8_t { host = 0, host_pinned = 1, cuda_device = 2 };

inline std::string_view to_string(memory_kind k) noexcept {
  switch (k) {
    case memory_kind::host: return "host";
    case memory_kind::host_pinned: return "host_pinned";
    case memory_kind::cuda_device: return "cuda_device";
  }
  return "unknown";
}

/// Where a byte range lives: its kind and, for cuda_device, the device ordinal.
struct memory_location {
  memory_kind kind = memory_kind::host;
  std::int32_t device = -1;  ///< CUDA device ordinal for cuda_device; -1 otherwise

  static constexpr memory_location host() noexcept { return {memory_kind::host, -1}; }
  static constexpr memory_location host_pinned() noexcept { return {memory_kind::host_pinned, -1}; }
  static constexpr memory_location cuda(std::int32_t ordinal) noexcept {
    return {memory_kind::cuda_device, ordinal};
  }
  friend bool operator==(const memory_location&, const memory_location&) = default;
};

/// "host", "host_pinned", "cuda_device:1", for messages.
inline std::string to_string(const memory_location& where) {
  std::string s(to_string(where.kind));
  if (where.kind == memory_kind::cuda_device) s += ":" + std::to_string(where.device);
  return s;
}

/// A set of memory kinds: what a transport can read (its sources) or write (its
/// destinations), stated at compile time.
class memory_kinds {
public:
  constexpr memory_kinds() noexcept = default;
  constexpr memory_kinds(std::initializer_list<memory_kind> kinds) noexcept {
    for (auto k : kinds) bits_ |= bit(k);
  }
  constexpr bool contains(memory_kind k) const noexcept { return (bits_ & bit(k)) != 0; }
  friend constexpr bool operator==(memory_kinds, memory_kinds) noexcept = default;

  /// "{host, host_pinned}", for messages.
  std::string describe() const {
    std::string s = "{";
    for (auto k : {memory_kind::host, memory_kind::host_pinned, memory_kind::cuda_device})
      if (contains(k)) s += (s.size() > 1 ? ", " : "") + std::string(to_string(k));
    return s + "}";
  }

private:
  static constexpr std::uint8_t bit(memory_kind k) noexcept {
    return static_cast<std::uint8_t>(1u << static_cast<unsigned>(k));
  }
  std::uint8_t bits_ = 0;
};

/// Throws shardline::error(errc::unsupported_memory) naming `what`, its location and the
/// kinds `who` can move, when `kinds` lacks the location's kind.
inline void require_kind(memory_kinds kinds, const memory_location& where, std::string_view who,
                         std::string_view what) {
  if (!kinds.contains(where.kind))
    throw error(make_error_code(errc::unsupported_memory),
                std::string(what) + " is " + to_string(where) + " memory, which " + std::string(who) +
                    " cannot move (it moves " + kinds.describe() + ")");
}

/// Local memory a transport may read from: the sender's staging arena, registered once.
/// `key` is the transport's local key (an ibv_mr lkey for verbs, 0 where unused).
struct local_region {
  std::byte* data = nullptr;
  std::size_t size = 0;
  std::uint32_t key = 0;
  memory_location location{};

  std::span<std::byte> bytes() const noexcept { return {data, size}; }
  bool contains(const std::byte* p, std::size_t n) const noexcept {
    return p >= data && n <= size && static_cast<std::size_t>(p - data) <= size - n;
  }
};

/// The registration of transports whose copies read the sender's memory in place
/// (loopback, shm): nothing to register or release, only the region to remember.
class unregistered_memory {
public:
  explicit unregistered_memory(std::span<std::byte> bytes, memory_location where = {}) noexcept
      : region_{bytes.data(), bytes.size(), 0, where} {}
  local_region region() const noexcept { return region_; }

private:
  local_region region_;
};

/// A tensor's element type and shape, as a receiver holds it.
struct tensor_layout {
  dtype type = dtype::bf16;
  std::vector<std::int64_t> shape;
  friend bool operator==(const tensor_layout&, const tensor_layout&) = default;
};

/// "bf16 [8, 16]", for messages.
inline std::string to_string(const tensor_layout& l) {
  return std::string(to_string(l.type)) + " " + shape_string(l.shape);
}

/// What a receiver exposes: a named byte range, where it lives and, for a tensor, its layout
/// (a byte region without one is checked by size alone).
struct exposure {
  std::string name;
  std::span<std::byte> bytes;
  memory_location location{};
  std::optional<tensor_layout> layout;
};

/// Memory a receiver exposed to its peer: address in the receiver's address space
/// (or offset in its shared arena, per transport), length and remote key, where it lives
/// and, for a tensor, its layout.
/// Local and remote memory are distinct types on purpose: one is never passed for the other.
struct remote_region {
  std::string name;
  std::uint64_t address = 0;
  std::uint64_t length = 0;
  std::uint32_t key = 0;
  memory_location location{};
  std::optional<tensor_layout> layout;

  bool contains(std::uint64_t addr, std::uint64_t n) const noexcept {
    return addr >= address && n <= length && addr - address <= length - n;
  }
  friend bool operator==(const remote_region&, const remote_region&) = default;
};

/// The receiver's exposed regions, as the sender sees them after connecting. Indexed by name
/// (hashed) and by address (ordered), so a lookup costs the same with 20 regions or 100,000.
/// Names are unique and non-empty regions never overlap: add() refuses both.
class region_table {
public:
  /// The version of serialize()'s format; parse() refuses any other with
  /// errc::protocol_version_mismatch.
  static constexpr std::uint32_t format_version = 2;
  /// Limits parse() checks before allocating.
  static constexpr std::uint64_t max_name_bytes = 4096;
  static constexpr std::uint32_t max_rank = 16;

  region_table() = default;
  explicit region_table(std::vector<remote_region> regions) {
    for (auto& r : regions) add(std::move(r));
  }

  /// Adds `r`. Throws shardline::error(errc::invalid_argument) naming the region when its
  /// name is taken, or when it overlaps a region already in the table.
  void add(remote_region r) {
    std::error_code ec;
    std::string why = check(r, ec);
    if (ec) throw error(ec, why);
    insert(std::move(r));
  }

  const std::vector<remote_region>& regions() const noexcept { return regions_; }
  bool empty() const noexcept { return regions_.empty(); }
  std::size_t size() const noexcept { return regions_.size(); }

  /// The region with this name, or nullptr.
  const remote_region* find(std::string_view name) const noexcept {
    const auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &regions_[it->second];
  }

  /// The region holding all of [address, address + length), or nullptr.
  const remote_region* find(std::uint64_t address, std::uint64_t length) const noexcept {
    if (auto it = by_address_.upper_bound(address); it != by_address_.begin()) {
      const remote_region& r = regions_[std::prev(it)->second];
      if (r.contains(address, length)) return &r;
    }
    if (length > 0) return nullptr;
    const auto e = empty_at_.find(address);
    return e == empty_at_.end() ? nullptr : &regions_[e->second];
  }

  /// Whether every byte of [address, address + length) lies in exposed regions that follow
  /// each other without a gap: a write the sender coalesced over neighbouring parameters of
  /// one arena is as legal as its pieces. (Transports whose keys differ per arena or per
  /// registration never see a write span two keys: the sender merges only equal keys.)
  bool covers(std::uint64_t address, std::uint64_t length) const noexcept {
    if (find(address, length)) return true;
    auto it = by_address_.upper_bound(address);
    if (it == by_address_.begin()) return false;
    // One descent, then neighbours in address order: a coalesced write costs its span's regions.
    for (--it; it != by_address_.end() && length > 0; ++it) {
      const remote_region& r = regions_[it->second];
      if (!r.contains(address, 1)) return false;
      const std::uint64_t available = r.address + r.length - address;
      if (available >= length) return true;
      address += available;
      length -= available;
    }
    return false;
  }

  /// Little-endian, length-prefixed encoding, versioned; the same bytes on every host.
  std::string serialize() const {
    std::string out = "SLRV";
    detail::put_le<std::uint32_t>(out, format_version);
    detail::put_le<std::uint64_t>(out, regions_.size());
    for (const auto& r : regions_) {
      detail::put_le<std::uint64_t>(out, r.name.size());
      out += r.name;
      detail::put_le<std::uint64_t>(out, r.address);
      detail::put_le<std::uint64_t>(out, r.length);
      detail::put_le<std::uint32_t>(out, r.key);
      detail::put_le<std::uint8_t>(out, static_cast<std::uint8_t>(r.location.kind));
      detail::put_le<std::int32_t>(out, r.location.device);
      detail::put_le<std::uint8_t>(out, r.layout ? 1 : 0);
      if (r.layout) {
        detail::put_le<std::uint8_t>(out, static_cast<std::uint8_t>(r.layout->type));
        detail::put_le<std::uint32_t>(out, static_cast<std::uint32_t>(r.layout->shape.size()));
        for (auto d : r.layout->shape) detail::put_le<std::int64_t>(out, d);
      }
    }
    return out;
  }

  /// Parses serialize()'s bytes. On failure returns an empty table and sets `ec`:
  /// errc::protocol_version_mismatch for a table of another format version (the first
  /// format, "SLRT", included), errc::protocol_error for anything malformed.
  static region_table parse(std::string_view bytes, std::error_code& ec) {
    std::string why;
    return parse(bytes, ec, why);
  }

  /// The throwing overload: shardline::error whose what() says what is wrong.
  static region_table parse(std::string_view bytes) {
    std::error_code ec;
    std::string why;
    auto t = parse(bytes, ec, why);
    throw_if(ec, "region table: " + why);
    return t;
  }

private:
  static region_table parse(std::string_view bytes, std::error_code& ec, std::string& why) {
    ec.clear();
    const auto fail = [&](errc e, std::string w) {
      ec = make_error_code(e);
      why = std::move(w);
      return region_table{};
    };
    if (bytes.substr(0, 4) == "SLRT")
      return fail(errc::protocol_version_mismatch,
                  "the peer speaks format version 1, this build speaks " +
                      std::to_string(format_version));
    detail::wire_reader in(bytes);
    std::uint32_t version = 0;
    if (!in.expect("SLRV") || !in.read(version)) return fail(errc::protocol_error, "malformed header");
    if (version != format_version)
      return fail(errc::protocol_version_mismatch,
                  "the peer speaks format version " + std::to_string(version) +
                      ", this build speaks " + std::to_string(format_version));
    std::uint64_t count = 0;
    // Every entry takes at least 34 bytes: a count beyond that is a lie, refused before reserving.
    if (!in.read(count) || count > in.remaining() / 34) return fail(errc::protocol_error, "malformed count");
    region_table t;
    t.regions_.reserve(static_cast<std::size_t>(count));
    for (std::uint64_t i = 0; i < count; ++i) {
      remote_region r;
      std::uint8_t kind = 0, has_layout = 0;
      if (!in.read_string(r.name, max_name_bytes) || !in.read(r.address) || !in.read(r.length) ||
          !in.read(r.key) || !in.read(kind) || !in.read(r.location.device) || !in.read(has_layout) ||
          kind > static_cast<std::uint8_t>(memory_kind::cuda_device) || has_layout > 1)
        return fail(errc::protocol_error, "malformed entry " + std::to_string(i));
      r.location.kind = static_cast<memory_kind>(kind);
      if (has_layout) {
        std::uint8_t type = 0;
        std::uint32_t rank = 0;
        if (!in.read(type) || !in.read(rank) || rank > max_rank || size_of(static_cast<dtype>(type)) == 0)
          return fail(errc::protocol_error, "malformed layout of '" + r.name + "'");
        tensor_layout l{static_cast<dtype>(type), std::vector<std::int64_t>(rank)};
        for (auto& d : l.shape)
          if (!in.read(d)) return fail(errc::protocol_error, "malformed layout of '" + r.name + "'");
        r.layout = std::move(l);
      }
      std::error_code bad;
      std::string w = check(r, bad, t);
      if (bad) return fail(errc::protocol_error, w);
      t.insert(std::move(r));
    }
    if (!in.done()) return fail(errc::protocol_error, "trailing bytes");
    return t;
  }

  std::string check(const remote_region& r, std::error_code& ec) const { return check(r, ec, *this); }

  static std::string check(const remote_region& r, std::error_code& ec, const region_table& t) {
    ec.clear();
    if (r.address + r.length < r.address) {
      ec = make_error_code(errc::invalid_argument);
      return "region '" + r.name + "': address + length overflows";
    }
    if (t.by_name_.count(r.name)) {
      ec = make_error_code(errc::invalid_argument);
      return "region '" + r.name + "' is exposed twice";
    }
    if (r.length == 0) return {};
    // Neighbours in address order are the only candidates for an overlap.
    auto next = t.by_address_.lower_bound(r.address);
    const auto overlaps = [&r](const remote_region& o) {
      return o.length > 0 && o.address < r.address + r.length && r.address < o.address + o.length;
    };
    const remote_region* hit = nullptr;
    if (next != t.by_address_.end() && overlaps(t.regions_[next->second])) hit = &t.regions_[next->second];
    if (!hit && next != t.by_address_.begin() && overlaps(t.regions_[std::prev(next)->second]))
      hit = &t.regions_[std::prev(next)->second];
    if (hit) {
      ec = make_error_code(errc::invalid_argument);
      return "region '" + r.name + "' (" + std::to_string(r.length) + " bytes) overlaps region '" +
             hit->name + "' (" + std::to_string(hit->length) + " bytes)";
    }
    return {};
  }

  void insert(remote_region r) {
    const std::size_t i = regions_.size();
    regions_.push_back(std::move(r));
    const remote_region& added = regions_.back();
    by_name_.emplace(added.name, i);
    // Empty regions hold no byte: kept out of the address index, whose neighbours find() and
    // the overlap check trust, they cannot hide a region or an overlap.
    if (added.length > 0)
      by_address_.emplace(added.address, i);
    else
      empty_at_.emplace(added.address, i);
  }

  struct name_hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };

  std::vector<remote_region> regions_;
  std::unordered_map<std::string, std::size_t, name_hash, std::equal_to<>> by_name_;
  std::map<std::uint64_t, std::size_t> by_address_;  // non-empty regions only: they never overlap
  std::map<std::uint64_t, std::size_t> empty_at_;    // zero-length regions, for find(address, 0)
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
