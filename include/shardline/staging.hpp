// shardline/staging.hpp: where a sender stages the bytes it loads before they go on the
// wire, as a compile-time policy of the pipeline.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>

#include <concepts>
#include <cstddef>
#include <new>
#include <span>
#include <string>
#include <utility>

namespace shardline {

/// A staging policy allocates `bytes` with `alignment` (a power of two) and gives back an
/// RAII block: movable, freeing its memory on destruction, with `bytes()` (the span) and
/// `location()` (where it lives, which the loader is told and the transport must be able to
/// read). host_staging is the default; pinned and device staging come with the CUDA part.
template <class S>
concept staging_policy = requires(S& s, std::size_t bytes, std::size_t alignment) {
  typename S::block;
  { s.allocate(bytes, alignment) } -> std::same_as<typename S::block>;
  requires std::movable<typename S::block>;
  requires requires(const typename S::block& b) {
    { b.bytes() } -> std::same_as<std::span<std::byte>>;
    { b.location() } -> std::same_as<memory_location>;
  };
};

/// Pageable host memory from the C++ allocator.
class host_staging {
public:
  class block {
  public:
    block() = default;
    block(block&& o) noexcept
        : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
          alignment_(o.alignment_) {}
    block& operator=(block&& o) noexcept {
      if (this != &o) {
        reset();
        data_ = std::exchange(o.data_, nullptr);
        size_ = std::exchange(o.size_, 0);
        alignment_ = o.alignment_;
      }
      return *this;
    }
    ~block() { reset(); }

    std::span<std::byte> bytes() const noexcept { return {data_, size_}; }
    memory_location location() const noexcept { return memory_location::host(); }

  private:
    friend class host_staging;
    block(std::byte* data, std::size_t size, std::size_t alignment) noexcept
        : data_(data), size_(size), alignment_(alignment) {}
    void reset() noexcept {
      if (data_) ::operator delete[](std::exchange(data_, nullptr), std::align_val_t(alignment_));
      size_ = 0;
    }
    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
    std::size_t alignment_ = 1;
  };

  /// Throws shardline::error(errc::invalid_argument) when `alignment` is not a power of two,
  /// std::bad_alloc when the memory is not there.
  block allocate(std::size_t bytes, std::size_t alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
      throw error(make_error_code(errc::invalid_argument),
                  "host_staging: alignment " + std::to_string(alignment) + " is not a power of two");
    auto* p = static_cast<std::byte*>(::operator new[](bytes ? bytes : 1, std::align_val_t(alignment)));
    return block(p, bytes, alignment);
  }
};

static_assert(staging_policy<host_staging>);

}  // namespace shardline
