// shardline/transport/verbs/error.hpp: work completion statuses as std::error_code.
#pragma once

#include <infiniband/verbs.h>

#include <string>
#include <system_error>

namespace shardline::verbs {

namespace detail {
class wc_category_impl final : public std::error_category {
public:
  const char* name() const noexcept override { return "verbs.wc"; }
  std::string message(int value) const override {
    return ibv_wc_status_str(static_cast<ibv_wc_status>(value));
  }
};
}  // namespace detail

/// The category of ibv_wc_status values: a failed work completion completes its
/// operation with std::error_code(wc.status, wc_category()); message() is
/// ibv_wc_status_str's text (e.g. "remote access error").
inline const std::error_category& wc_category() noexcept {
  static const detail::wc_category_impl instance;
  return instance;
}

inline std::error_code make_wc_error(ibv_wc_status status) noexcept {
  return {static_cast<int>(status), wc_category()};
}

}  // namespace shardline::verbs
