// Half of the one-definition check (test_asio_one_definition.cpp has the other half and the
// case): Asio's configuration is the first thing this translation unit reads, before any
// standard header, the include order that made Asio 1.22 leave std::aligned_alloc unused.
#include <asio/detail/config.hpp>

namespace shardline::testing {

bool asio_aligned_alloc_when_asio_comes_first() {
#if defined(ASIO_HAS_STD_ALIGNED_ALLOC)
  return true;
#else
  return false;
#endif
}

}  // namespace shardline::testing
