// shardline/error.hpp: the library's error codes and the exception that carries them.
#pragma once

#include <shardline/detail/asio_config.hpp>

#include <string>
#include <system_error>

namespace shardline {

/// Error conditions reported by shardline operations. Asynchronous operations
/// complete with a std::error_code in this category; synchronous calls come in a
/// throwing overload (shardline::error) and an std::error_code& overload.
enum class errc {
  size_mismatch = 1,     ///< source and destination byte counts differ
  unknown_parameter,     ///< a name that is not in the plan, barrier or region table
  duplicate_shard,       ///< a shard arrived twice for the same parameter
  too_many_shards,       ///< a shard index at or past the expected count
  shard_timeout,         ///< a barrier wait expired before every shard arrived
  loader_failed,         ///< the user's loader threw
  region_not_exposed,    ///< a write outside every region the receiver exposed
  peer_disconnected,     ///< the peer closed or died while operations were pending
  not_connected,         ///< an operation on a connection that is closed or never opened
  connection_failed,     ///< the transport's connection is in an error state and is not reused
  request_too_large,     ///< a request exceeds a limiter's whole capacity and could never run
  invalid_argument,      ///< a malformed descriptor, plan or option
  no_device,             ///< no RDMA device is present or the named one is missing
  protocol_error,        ///< a control message that does not parse
  protocol_version_mismatch,  ///< the peer speaks another version of a wire format
  unsupported_memory,    ///< a memory kind the transport (or staging) cannot move
  layout_mismatch,       ///< same byte count, but another dtype or shape
  plan_mismatch,         ///< the peers were built from different plans (fingerprints differ)
  unknown_sender,        ///< a sender id the receiver does not expect
  stale_version,         ///< a version that does not move forward
  version_abandoned,     ///< a version that can never commit (a sender failed or left mid-version)
  ack_timeout,           ///< a peer did not acknowledge a notice in time
  authentication_failed, ///< the peer did not prove that it holds the shared key (or holds another)
  peer_not_allowed,      ///< the peer's kernel credentials (uid) do not allow it to connect
};

namespace detail {
/// The highest errc value; wire formats that carry an errc refuse anything above it.
inline constexpr errc last_errc = errc::peer_not_allowed;
}  // namespace detail

namespace detail {
class error_category_impl final : public std::error_category {
public:
  const char* name() const noexcept override { return "shardline"; }
  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::size_mismatch: return "source and destination sizes differ";
      case errc::unknown_parameter: return "unknown parameter";
      case errc::duplicate_shard: return "shard arrived twice";
      case errc::too_many_shards: return "more shards than expected";
      case errc::shard_timeout: return "timed out waiting for shards";
      case errc::loader_failed: return "loader failed";
      case errc::region_not_exposed: return "write outside every exposed region";
      case errc::peer_disconnected: return "peer disconnected";
      case errc::not_connected: return "not connected";
      case errc::connection_failed: return "connection is in an error state";
      case errc::request_too_large: return "request exceeds the limiter's capacity";
      case errc::invalid_argument: return "invalid argument";
      case errc::no_device: return "no RDMA device";
      case errc::protocol_error: return "protocol error";
      case errc::protocol_version_mismatch: return "peer speaks another protocol version";
      case errc::unsupported_memory: return "memory kind not supported";
      case errc::layout_mismatch: return "dtype or shape differ";
      case errc::plan_mismatch: return "peers built from different plans";
      case errc::unknown_sender: return "unknown sender";
      case errc::stale_version: return "version does not move forward";
      case errc::version_abandoned: return "version abandoned";
      case errc::ack_timeout: return "peer did not acknowledge in time";
      case errc::authentication_failed: return "authentication failed: the peers do not hold the same key";
      case errc::peer_not_allowed: return "the peer's credentials do not allow it to connect";
    }
    return "unknown shardline error";
  }
};
}  // namespace detail

/// The category of shardline::errc. A function-local static, as Asio's own categories.
inline const std::error_category& error_category() noexcept {
  static const detail::error_category_impl instance;
  return instance;
}

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

/// Thrown by the throwing overloads and delivered through std::exception_ptr by the
/// pipeline. what() names the parameter (or shard, or region) and the cause, once: the
/// code's message is appended only when `what` does not already say it.
class error : public std::system_error {
public:
  error(std::error_code ec, const std::string& what)
      : std::system_error(ec),
        what_(what.empty() ? ec.message() : says(what, ec) ? what : what + ": " + ec.message()) {}
  error(std::error_code ec, const char* what) : error(ec, std::string(what)) {}
  explicit error(std::error_code ec) : std::system_error(ec), what_(ec.message()) {}

  const char* what() const noexcept override { return what_.c_str(); }

private:
  static bool says(const std::string& what, const std::error_code& ec) {
    const std::string cause = ec.message();
    return what.find(cause) != std::string::npos;
  }
  std::string what_;
};

/// Throws shardline::error when ec is set; the throwing overloads end with this.
inline void throw_if(const std::error_code& ec, const std::string& what) {
  if (ec) throw error(ec, what);
}

}  // namespace shardline

template <>
struct std::is_error_code_enum<shardline::errc> : std::true_type {};
