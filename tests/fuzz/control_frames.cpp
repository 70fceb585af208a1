// The fixed-size control frames (transport/detail/control.hpp): hello, verdict and notice,
// each decoded from the front of the input (zero-padded). What decodes must encode back to
// the same frame: the format has one encoding, so nothing a peer sends is read two ways.
#include <shardline/transport/detail/control.hpp>

#include "fuzz_check.hpp"

#include <algorithm>
#include <cstring>

namespace sl = shardline;
namespace sd = shardline::detail;

namespace {

template <std::size_t N>
std::array<std::byte, N> frame_of(std::string_view in) {
  std::array<std::byte, N> f{};
  std::memcpy(f.data(), in.data(), std::min(N, in.size()));
  return f;
}

void check_hello(std::string_view magic, const sd::hello_frame& f) {
  sl::sender_identity who{7, 9};
  const auto ec = sd::decode_hello(magic, f, who);
  if (ec) {
    FUZZ_CHECK(ec == sl::errc::protocol_error || ec == sl::errc::protocol_version_mismatch);
    if (ec == sl::errc::protocol_error) FUZZ_CHECK(std::memcmp(f.data(), magic.data(), 4) != 0);
    return;
  }
  FUZZ_CHECK(sd::encode_hello(magic, who) == f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto in = fuzz::bytes_of(data, size);

  const auto hello = frame_of<sd::hello_bytes>(in);
  check_hello("SLSH", hello);
  check_hello("SLVB", hello);

  const auto verdict = frame_of<sd::verdict_bytes>(in);
  if (const auto refusal = sd::decode_verdict(verdict)) {
    FUZZ_CHECK(refusal.category() == sl::error_category());
    if (refusal != sl::errc::protocol_error) FUZZ_CHECK(sd::encode_verdict(refusal) == verdict);
  } else {
    FUZZ_CHECK(sd::encode_verdict({}) == verdict);
  }

  // Every 8-byte frame of the input in turn, as a notice stream would carry them.
  for (std::size_t at = 0; at == 0 || at < in.size(); at += sd::notice_bytes) {
    const auto frame = frame_of<sd::notice_bytes>(in.substr(std::min(at, in.size())));
    sl::notice n{};
    if (sd::decode_notice(frame, 42, n)) continue;
    FUZZ_CHECK(n.sender == 42);
    FUZZ_CHECK(sl::to_string(n.kind) != "unknown");
    FUZZ_CHECK(sd::encode_notice(n.kind, n.version) == frame);
  }
  return 0;
}
