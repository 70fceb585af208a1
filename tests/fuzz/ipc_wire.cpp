// The CUDA IPC export (cuda/detail/ipc_wire.hpp), which needs no CUDA, as it travels:
// decode_header on the 16 bytes after the input's first byte, parse_export on the rest, with
// the count of descriptors that "came with them" taken from the first byte. What parses must serialize back to the same bytes,
// its allocations ascending and disjoint, every region inside them.
#include <shardline/cuda/detail/ipc_wire.hpp>

#include "fuzz_check.hpp"

namespace sl = shardline;
namespace cd = shardline::cuda::detail;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::size_t fds = data[0] % 8;  // 0..7 descriptors: the kinds of lies are the same with more
  const auto in = fuzz::bytes_of(data + 1, size - 1);
  if (in.size() < cd::ipc_header_bytes) return 0;
  {
    std::uint32_t announced = 0;
    std::uint64_t payload = 0;
    const auto* h = reinterpret_cast<const std::byte*>(in.data());
    if (!cd::decode_header(h, fds, announced, payload)) {
      FUZZ_CHECK(announced <= cd::ipc_max_allocations && payload <= cd::ipc_max_payload && payload >= 16);
      FUZZ_CHECK(cd::encode_header(announced, payload) == in.substr(0, cd::ipc_header_bytes));
    }
  }

  std::error_code ec;
  std::string why;
  const auto payload = in.substr(cd::ipc_header_bytes);
  const auto x = cd::parse_export(payload, fds, ec, why);
  if (ec) {
    FUZZ_CHECK(ec == sl::errc::protocol_error || ec == sl::errc::protocol_version_mismatch);
    FUZZ_CHECK(!why.empty());
    return 0;
  }
  FUZZ_CHECK(cd::serialize(x) == payload);
  std::size_t vmm = 0;
  for (std::size_t i = 0; i < x.allocations.size(); ++i) {
    const auto& a = x.allocations[i];
    FUZZ_CHECK(a.size > 0 && a.base + a.size > a.base);
    if (i > 0) FUZZ_CHECK(x.allocations[i - 1].base + x.allocations[i - 1].size <= a.base);
    FUZZ_CHECK(cd::allocation_at(x.allocations, a.base) == static_cast<std::ptrdiff_t>(i));
    FUZZ_CHECK(cd::allocation_at(x.allocations, a.base + a.size - 1) == static_cast<std::ptrdiff_t>(i));
    if (a.kind == cd::ipc_handle_kind::vmm) {
      FUZZ_CHECK(a.fd_index < fds);
      ++vmm;
    }
  }
  FUZZ_CHECK(vmm == fds);  // every descriptor belongs to exactly one allocation
  for (const auto& r : x.table.regions()) {
    FUZZ_CHECK(r.location.kind == sl::memory_kind::cuda_device);
    FUZZ_CHECK(cd::allocations_cover(x.allocations, r.address, r.length));
  }
  return 0;
}
