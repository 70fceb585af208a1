// What a CUDA IPC receiver hands each sender it admits, after the verdict:
//   a 16-byte header sent as one message with the first 253 (SCM_MAX_FD) of the VMM
//   allocations' file descriptors attached (SCM_RIGHTS): "SLCI", u32 descriptor count, u64
//   payload bytes; then, while descriptors remain, 4-byte messages "SLCF" carrying 253 more;
//   the payload: "SLCI", u32 format version, the exporter's boot id (length-prefixed, at most
//   64 bytes) and process id (u32), u32 allocation count, per allocation
//     u8 kind (1: legacy cudaIpcMemHandle_t, 2: VMM shareable file descriptor),
//     i32 device ordinal (the receiver's), 16 bytes device UUID,
//     u64 base address and u64 size (the receiver's),
//     then the 64-byte legacy handle, or the u32 index of its descriptor in the header's,
//   then region_table::serialize(). Every region lies inside exported allocations.
// Little-endian through detail/codec.hpp; every count is checked against a limit and against
// what is left of the input before anything is reserved. Nothing here calls CUDA: the whole
// format is tested where no GPU is.
#pragma once

#include <shardline/detail/codec.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace shardline::cuda::detail {

inline constexpr std::string_view ipc_magic = "SLCI";
inline constexpr std::uint32_t ipc_format_version = 1;
inline constexpr std::size_t ipc_header_bytes = 16;
inline constexpr std::uint64_t ipc_max_payload = std::uint64_t(1) << 30;
/// Allocations one receiver may export: bounded before anything is reserved.
inline constexpr std::uint32_t ipc_max_allocations = 1u << 16;
inline constexpr std::uint64_t ipc_max_boot_id = 64;
inline constexpr std::size_t ipc_legacy_handle_bytes = 64;  // sizeof(cudaIpcMemHandle_t)

/// How one allocation of the receiver travels.
enum class ipc_handle_kind : std::uint8_t {
  legacy = 1,  ///< cudaIpcGetMemHandle of the allocation's base
  vmm = 2,     ///< cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR), the fd over the socket
};

inline std::string_view to_string(ipc_handle_kind k) noexcept {
  return k == ipc_handle_kind::legacy ? "legacy IPC handle" : k == ipc_handle_kind::vmm ? "VMM shareable handle" : "?";
}

using device_uuid = std::array<std::byte, 16>;

/// "GPU-6b2f...": a UUID as nvidia-smi prints it, for messages.
inline std::string to_string(const device_uuid& u) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string s = "GPU-";
  for (std::size_t i = 0; i < u.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    const auto b = std::to_integer<unsigned>(u[i]);
    s += hex[b >> 4];
    s += hex[b & 15];
  }
  return s;
}

/// One exported allocation, as the receiver describes it.
struct ipc_allocation {
  ipc_handle_kind kind = ipc_handle_kind::legacy;
  std::int32_t device = 0;
  device_uuid uuid{};
  std::uint64_t base = 0;
  std::uint64_t size = 0;
  std::array<std::byte, ipc_legacy_handle_bytes> legacy{};  // kind legacy
  std::uint32_t fd_index = 0;                               // kind vmm

  bool contains(std::uint64_t address) const noexcept { return address >= base && address - base < size; }
  friend bool operator==(const ipc_allocation&, const ipc_allocation&) = default;
};

/// Everything a sender learns about a receiver's memory.
struct ipc_export {
  std::string boot_id;  ///< /proc/sys/kernel/random/boot_id of the exporting host
  std::uint32_t pid = 0;
  std::vector<ipc_allocation> allocations;  ///< ascending base, non-overlapping
  region_table table;
};

/// This host's boot id: handles are meaningful only on the host and boot that made them.
/// Empty when it cannot be read.
inline std::string this_boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id.substr(0, ipc_max_boot_id);
}

inline std::string serialize(const ipc_export& x) {
  std::string out(ipc_magic);
  shardline::detail::put_le<std::uint32_t>(out, ipc_format_version);
  shardline::detail::put_le<std::uint64_t>(out, x.boot_id.size());
  out += x.boot_id;
  shardline::detail::put_le<std::uint32_t>(out, x.pid);
  shardline::detail::put_le<std::uint32_t>(out, static_cast<std::uint32_t>(x.allocations.size()));
  for (const auto& a : x.allocations) {
    shardline::detail::put_le<std::uint8_t>(out, static_cast<std::uint8_t>(a.kind));
    shardline::detail::put_le<std::int32_t>(out, a.device);
    out.append(reinterpret_cast<const char*>(a.uuid.data()), a.uuid.size());
    shardline::detail::put_le<std::uint64_t>(out, a.base);
    shardline::detail::put_le<std::uint64_t>(out, a.size);
    if (a.kind == ipc_handle_kind::legacy)
      out.append(reinterpret_cast<const char*>(a.legacy.data()), a.legacy.size());
    else
      shardline::detail::put_le<std::uint32_t>(out, a.fd_index);
  }
  out += x.table.serialize();
  return out;
}

/// The index of the allocation holding `address`, or -1. `allocations` ascending by base.
inline std::ptrdiff_t allocation_at(const std::vector<ipc_allocation>& allocations, std::uint64_t address) noexcept {
  auto it = std::upper_bound(allocations.begin(), allocations.end(), address,
                             [](std::uint64_t a, const ipc_allocation& x) { return a < x.base; });
  if (it == allocations.begin()) return -1;
  --it;
  return it->contains(address) ? it - allocations.begin() : -1;
}

/// Whether [address, address + length) lies in allocations that follow each other without a
/// gap (a region may span two chunks of one expandable segment).
inline bool allocations_cover(const std::vector<ipc_allocation>& allocations, std::uint64_t address,
                              std::uint64_t length) noexcept {
  while (length > 0) {
    const auto i = allocation_at(allocations, address);
    if (i < 0) return false;
    const auto& a = allocations[static_cast<std::size_t>(i)];
    const std::uint64_t available = a.base + a.size - address;
    if (available >= length) return true;
    address += available;
    length -= available;
  }
  return true;
}

/// Parses serialize()'s bytes, `fds` being the number of descriptors that came with them.
/// On failure `ec` is errc::protocol_version_mismatch (another format version) or
/// errc::protocol_error, and `why` says what is wrong, once.
inline ipc_export parse_export(std::string_view bytes, std::size_t fds, std::error_code& ec, std::string& why) {
  ec.clear();
  const auto fail = [&](errc e, std::string w) {
    ec = make_error_code(e);
    why = std::move(w);
    return ipc_export{};
  };
  shardline::detail::wire_reader in(bytes);
  std::uint32_t version = 0;
  if (!in.expect(ipc_magic) || !in.read(version)) return fail(errc::protocol_error, "not a CUDA IPC export (bad magic)");
  if (version != ipc_format_version)
    return fail(errc::protocol_version_mismatch, "the receiver speaks CUDA IPC format version " + std::to_string(version) +
                                                     ", this build speaks " + std::to_string(ipc_format_version));
  ipc_export x;
  std::uint32_t count = 0;
  if (!in.read_string(x.boot_id, ipc_max_boot_id) || !in.read(x.pid) || !in.read(count))
    return fail(errc::protocol_error, "truncated header");
  // The smallest entry (a VMM one) takes 41 bytes: a count beyond what is left is a lie.
  if (count > ipc_max_allocations || count > in.remaining() / 41)
    return fail(errc::protocol_error, "allocation count " + std::to_string(count) + " exceeds the limit (" +
                                          std::to_string(ipc_max_allocations) + ") or the message");
  x.allocations.reserve(count);
  std::vector<bool> fd_used(fds, false);
  for (std::uint32_t i = 0; i < count; ++i) {
    ipc_allocation a;
    std::uint8_t kind = 0;
    const auto where = "allocation " + std::to_string(i);
    if (!in.read(kind) || !in.read(a.device)) return fail(errc::protocol_error, where + " is truncated");
    for (auto& b : a.uuid) {
      std::uint8_t v = 0;
      if (!in.read(v)) return fail(errc::protocol_error, where + " is truncated");
      b = std::byte{v};
    }
    if (!in.read(a.base) || !in.read(a.size)) return fail(errc::protocol_error, where + " is truncated");
    if (kind == static_cast<std::uint8_t>(ipc_handle_kind::legacy)) {
      a.kind = ipc_handle_kind::legacy;
      for (auto& b : a.legacy) {
        std::uint8_t v = 0;
        if (!in.read(v)) return fail(errc::protocol_error, where + " is truncated");
        b = std::byte{v};
      }
    } else if (kind == static_cast<std::uint8_t>(ipc_handle_kind::vmm)) {
      a.kind = ipc_handle_kind::vmm;
      if (!in.read(a.fd_index)) return fail(errc::protocol_error, where + " is truncated");
      if (a.fd_index >= fds || fd_used[a.fd_index])
        return fail(errc::protocol_error, where + " names descriptor " + std::to_string(a.fd_index) + " of " +
                                              std::to_string(fds) + " (missing or used twice)");
      fd_used[a.fd_index] = true;
    } else {
      return fail(errc::protocol_error, where + " has unknown handle kind " + std::to_string(kind));
    }
    if (a.size == 0 || a.base + a.size < a.base)
      return fail(errc::protocol_error, where + " has an empty or wrapping range");
    if (!x.allocations.empty() && a.base < x.allocations.back().base + x.allocations.back().size)
      return fail(errc::protocol_error, where + " overlaps or precedes the one before it");
    x.allocations.push_back(a);
  }
  for (std::size_t i = 0; i < fds; ++i)
    if (!fd_used[i]) return fail(errc::protocol_error, "descriptor " + std::to_string(i) + " belongs to no allocation");
  const auto rest = bytes.substr(bytes.size() - in.remaining());
  std::error_code table_ec;
  x.table = region_table::parse(rest, table_ec);
  if (table_ec) return fail(table_ec == errc::protocol_version_mismatch ? errc::protocol_version_mismatch : errc::protocol_error,
                            "malformed region table");
  // Writes are translated through the allocations: a region outside them would be a write
  // through no mapping.
  for (const auto& r : x.table.regions())
    if (r.location.kind != memory_kind::cuda_device || !allocations_cover(x.allocations, r.address, r.length))
      return fail(errc::protocol_error, "region '" + r.name + "' lies outside every exported allocation");
  return x;
}

/// Descriptors per message: the kernel's limit on one SCM_RIGHTS message (SCM_MAX_FD).
inline constexpr std::size_t ipc_fds_per_message = 253;
/// The 4-byte message that carries each further group of descriptors, after the header.
inline constexpr std::string_view ipc_fd_carrier = "SLCF";

/// The 16-byte header: it carries the first ipc_fds_per_message descriptors, and announces
/// all of them (`fds`); the rest follow in carrier messages of ipc_fds_per_message each.
inline std::string encode_header(std::uint32_t fds, std::uint64_t payload) {
  std::string h(ipc_magic);
  shardline::detail::put_le<std::uint32_t>(h, fds);
  shardline::detail::put_le<std::uint64_t>(h, payload);
  return h;
}

/// Checks a header against the descriptors that came with it; gives the descriptors announced
/// in all and the payload size.
inline std::error_code decode_header(const std::byte* h, std::size_t fds_received, std::uint32_t& fds,
                                     std::uint64_t& payload) {
  fds = shardline::detail::get_le<std::uint32_t>(h + 4);
  payload = shardline::detail::get_le<std::uint64_t>(h + 8);
  if (std::memcmp(h, ipc_magic.data(), 4) != 0 || fds > ipc_max_allocations ||
      fds_received != std::min<std::size_t>(fds, ipc_fds_per_message) || payload > ipc_max_payload || payload < 16)
    return make_error_code(errc::protocol_error);
  return {};
}

}  // namespace shardline::cuda::detail
