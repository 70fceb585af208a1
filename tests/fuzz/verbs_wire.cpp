// The verbs QP exchange (transport/verbs/detail/wire.hpp): decode_fixed on the input's front,
// then, as the connection does, decode_qps on the 8 * n bytes that follow. What decodes must
// encode back to the same bytes.
#include <shardline/transport/verbs/detail/wire.hpp>

#include "fuzz_check.hpp"

#include <cstring>

namespace vd = shardline::verbs::detail;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto in = fuzz::bytes_of(data, size);
  ibv_gid gid{};
  const std::size_t n = vd::decode_fixed(in, gid);
  if (n == 0) return 0;
  FUZZ_CHECK(n <= vd::wire_max_qps);
  FUZZ_CHECK(in.size() >= vd::wire_fixed);
  FUZZ_CHECK(std::memcmp(gid.raw, in.data() + 8, 16) == 0);
  // The connection reads exactly 8 * n more bytes before decoding them.
  const auto rest = in.substr(vd::wire_fixed);
  // Fewer bytes than promised: the reader stops at the end (zeros), it never reads past it.
  if (rest.size() < 8 * n) {
    FUZZ_CHECK(vd::decode_qps(rest, n).size() == n);
    return 0;
  }
  const auto qps = vd::decode_qps(rest, n);
  FUZZ_CHECK(qps.size() == n);
  FUZZ_CHECK(vd::encode_endpoints(gid, qps) == in.substr(0, vd::wire_fixed + 8 * n));
  return 0;
}
