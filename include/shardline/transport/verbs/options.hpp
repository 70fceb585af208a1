// shardline/transport/verbs/options.hpp: how the verbs transport is tuned.
#pragma once

#include <shardline/transport/detail/psk_auth.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace shardline::verbs {

/// How the completion queue is polled, chosen at compile time.
/// - event: sleep on the completion channel's fd (Asio's reactor), drain, re-arm, drain.
/// - busy: while operations are outstanding, poll again through asio::post (never sleeps
///   while work is pending; costs a core while busy).
/// - adaptive: poll through asio::post for a bounded number of empty polls while work is
///   outstanding, then arm the channel and sleep on its fd.
/// Every mode runs a fallback poll timer while work is outstanding.
enum class poll_mode { event, busy, adaptive };

struct options {
  std::string device;               ///< empty: the first device whose `port` is active
  std::uint8_t port = 1;
  int gid_index = -1;               ///< -1: the RoCE v2 GID holding an IPv4-mapped address
  std::size_t queue_pairs = 2;      ///< per peer; writes are striped across them
  std::uint32_t max_send_wr = 256;  ///< per sender QP: WRs in flight before writes wait
  std::uint32_t cq_entries = 1024;  ///< per connection; every posted WR reserves one entry
  std::uint32_t signal_every = 16;  ///< selective signalling interval
  std::size_t max_wr_per_post = 64; ///< WRs per ibv_post_send chain (and per QP per loop turn)
  std::size_t max_write_bytes = 0;  ///< 0: the port's max_msg_sz; smaller splits writes further
  std::uint8_t timeout = 16;        ///< local ACK timeout exponent (4.096 us * 2^16 = 268 ms)
  std::uint8_t retry_count = 7;     ///< a dead peer surfaces after about (retry_count+1) timeouts: ~2.1 s
  std::uint8_t rnr_retry = 3;
  unsigned spin_polls = 16;         ///< adaptive mode: empty polls before sleeping on the fd
  std::chrono::milliseconds fallback_poll{50};  ///< a missed CQ event cannot hang an update
  std::chrono::milliseconds connect_timeout{10000};  ///< bounds async_connect, and each handshake of async_accept
  /// The key both ends of a control connection must hold: each proves it before the
  /// receiver sends anything but a challenge (no verdict, QP, region table or rkey), so only
  /// holders of the key can write the receiver's memory. Sender and receiver need the same.
  std::optional<shared_key> key;
  /// Without a key the transport refuses to be constructed unless this is true: then anyone
  /// who reaches the receiver's control port can write the weights, and each transport
  /// object says so on stderr. Ignored when `key` is set.
  bool allow_unauthenticated = false;
};

}  // namespace shardline::verbs
