// The one little-endian codec of every wire format (region table, handshakes, control
// messages): fixed-width integers out, and a bounds-checked reader that never reads past its
// input and checks every length against a limit before anything is allocated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace shardline::detail {

template <class Int>
void put_le(std::string& out, Int value) {
  const auto v = static_cast<std::uint64_t>(value);
  for (std::size_t i = 0; i < sizeof(Int); ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

template <class Int>
Int get_le(const void* p) noexcept {
  std::uint64_t v = 0;
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < sizeof(Int); ++i) v |= std::uint64_t(b[i]) << (8 * i);
  return static_cast<Int>(v);
}

/// Reads fields off the front of a byte string. Every read reports failure (false) instead
/// of reading past the end; a failed reader stays failed.
class wire_reader {
public:
  explicit wire_reader(std::string_view in) noexcept : in_(in) {}

  template <class Int>
  bool read(Int& v) noexcept {
    if (!ok_ || in_.size() < sizeof(Int)) return ok_ = false;
    v = get_le<Int>(in_.data());
    in_.remove_prefix(sizeof(Int));
    return true;
  }

  /// A u64 length then that many bytes; fails when the length exceeds `limit` or the input.
  bool read_string(std::string& s, std::uint64_t limit) {
    std::uint64_t n = 0;
    if (!read(n) || n > limit || n > in_.size()) return ok_ = false;
    s.assign(in_.substr(0, static_cast<std::size_t>(n)));
    in_.remove_prefix(static_cast<std::size_t>(n));
    return true;
  }

  bool expect(std::string_view literal) noexcept {
    if (!ok_ || in_.substr(0, literal.size()) != literal) return ok_ = false;
    in_.remove_prefix(literal.size());
    return true;
  }

  bool ok() const noexcept { return ok_; }
  std::size_t remaining() const noexcept { return in_.size(); }
  bool done() const noexcept { return ok_ && in_.empty(); }

private:
  std::string_view in_;
  bool ok_ = true;
};

}  // namespace shardline::detail
