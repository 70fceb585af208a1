// region_table::parse (shardline/memory.hpp, used by every transport's handshake) on any bytes.
// A table that parses must be what serialize() would have sent (the format has one encoding),
// parse the same again, and answer its lookups inside its own regions.
#include <shardline/memory.hpp>

#include "fuzz_check.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace sl = shardline;

namespace {

void check_lookups(const sl::region_table& t, std::uint64_t address, std::uint64_t length) {
  if (const auto* r = t.find(address, length)) {
    FUZZ_CHECK(r->contains(address, length) || (length == 0 && r->address == address));
    FUZZ_CHECK(t.covers(address, length));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto in = fuzz::bytes_of(data, size);
  std::error_code ec;
  const auto t = sl::region_table::parse(in, ec);
  // The throwing overload agrees with the error_code one.
  try {
    (void)sl::region_table::parse(in);
    FUZZ_CHECK(!ec);
  } catch (const sl::error& e) {
    FUZZ_CHECK(ec && e.code() == ec);
  }
  if (ec) {
    FUZZ_CHECK(ec == sl::errc::protocol_error || ec == sl::errc::protocol_version_mismatch);
    FUZZ_CHECK(t.empty());
    return 0;
  }

  const std::string again = t.serialize();
  FUZZ_CHECK(again == in);
  std::error_code ec2;
  const auto u = sl::region_table::parse(again, ec2);
  FUZZ_CHECK(!ec2);
  FUZZ_CHECK(u.regions() == t.regions());

  std::vector<const sl::remote_region*> by_address;
  for (const auto& r : t.regions()) {
    FUZZ_CHECK(t.find(r.name) == &r);
    FUZZ_CHECK(r.address + r.length >= r.address);
    if (r.layout) FUZZ_CHECK(r.layout->shape.size() <= sl::region_table::max_rank);
    if (r.length > 0) {
      FUZZ_CHECK(t.find(r.address, r.length) == &r);
      FUZZ_CHECK(t.find(r.address + r.length - 1, 1) == &r);
      FUZZ_CHECK(t.covers(r.address, r.length));
      by_address.push_back(&r);
    } else {
      FUZZ_CHECK(t.find(r.address, 0) != nullptr);
    }
    check_lookups(t, r.address - 1, 2);
    check_lookups(t, r.address + r.length, 1);
    check_lookups(t, r.address, r.length + 1);
  }
  // Non-empty regions never overlap.
  std::sort(by_address.begin(), by_address.end(), [](auto* a, auto* b) { return a->address < b->address; });
  for (std::size_t i = 1; i < by_address.size(); ++i)
    FUZZ_CHECK(by_address[i - 1]->address + by_address[i - 1]->length <= by_address[i]->address);
  // A span over neighbouring regions without a gap is covered; one over a gap is not.
  for (std::size_t i = 1; i < by_address.size(); ++i) {
    const auto* a = by_address[i - 1];
    const auto* b = by_address[i];
    const bool adjacent = a->address + a->length == b->address;
    FUZZ_CHECK(t.covers(a->address, b->address + b->length - a->address) == adjacent ||
               (!adjacent && t.find(a->address + a->length, 1)));
  }
  return 0;
}
