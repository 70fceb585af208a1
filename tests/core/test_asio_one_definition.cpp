// Asio 1.22 compiles its aligned allocation (asio::detail::aligned_new/aligned_delete,
// behind every recycled handler allocation) with std::aligned_alloc + std::free only when a
// standard header came before its configuration, and with operator new/delete otherwise:
// two translation units of one program that include in different orders define the same
// inline functions two ways, and the linker keeps one of each (ASan counted 1,148
// alloc-dealloc mismatches). The targets define ASIO_HAS_STD_ALIGNED_ALLOC; this checks that
// both include orders, in two translation units of this binary, see the same definition.
#include <cstdlib>  // first on purpose: the order that lets Asio find aligned_alloc by itself

#include <asio/detail/config.hpp>

#include <doctest/doctest.h>

namespace shardline::testing {
bool asio_aligned_alloc_when_asio_comes_first();
}

TEST_CASE("Asio's aligned allocation is compiled one way whatever the include order") {
#if defined(ASIO_HAS_STD_ALIGNED_ALLOC)
  constexpr bool standard_header_first = true;
#else
  constexpr bool standard_header_first = false;
#endif
  const bool asio_first = shardline::testing::asio_aligned_alloc_when_asio_comes_first();
  INFO("build with the shardline targets' definitions (ASIO_HAS_STD_ALIGNED_ALLOC=1)");
  CHECK(asio_first == standard_header_first);
  CHECK(asio_first);  // the targets decide for std::aligned_alloc
}
