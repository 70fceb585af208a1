// What the core tests share to drive an io_context without hanging and to check an error's
// message: that it names what it should and says its cause exactly once.
#pragma once

#include <shardline/error.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <initializer_list>
#include <string>
#include <string_view>

namespace shardline::testing {

/// Runs handlers until `done()`. False when no work is left, or when no handler ran for a few
/// seconds (a hang): the caller fails the test instead of waiting for ever.
template <class Done>
bool drive(asio::io_context& io, Done done) {
  while (!done()) {
    io.restart();
    if (io.run_one_for(std::chrono::seconds(3)) == 0) return done();
  }
  return true;
}

/// Runs every handler that is ready now, and those they make ready.
inline void settle(asio::io_context& io) {
  io.restart();
  io.poll();
}

inline std::size_t occurrences(std::string_view text, std::string_view word) {
  std::size_t n = 0;
  for (auto at = text.find(word); at != std::string_view::npos; at = text.find(word, at + word.size())) ++n;
  return n;
}

/// `text` names each of `names`, and says `cause` exactly once.
inline void check_text(std::string_view text, std::string_view cause, std::initializer_list<std::string_view> names) {
  INFO("text: " << std::string(text));
  for (auto name : names) CHECK_MESSAGE(text.find(name) != std::string_view::npos, "lacks " << std::string(name));
  CHECK(occurrences(text, cause) == 1);
}

/// `f()` throws shardline::error with `code`, whose what() names `names` and says the code's
/// message once.
template <class F>
void check_throws(F&& f, errc code, std::initializer_list<std::string_view> names) {
  try {
    f();
    FAIL_CHECK("no error thrown, expected: " << make_error_code(code).message());
  } catch (const error& e) {
    CHECK(e.code() == code);
    check_text(e.what(), make_error_code(code).message(), names);
  }
}

}  // namespace shardline::testing
