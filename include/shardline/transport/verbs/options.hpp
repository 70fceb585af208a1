// shardline/transport/verbs/options.hpp: how the verbs transport is tuned.
#pragma once

#include <shardline/memory.hpp>
#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/detail/psk_auth.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/memory_region.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
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

/// Whether a receiver hands out memory-window rkeys (see options::memory_windows).
enum class memory_window_use {
  automatic,  ///< where the device supports type 2 windows (device::supports_memory_windows)
  off,        ///< never: every sender gets the memory regions' own rkeys
  required,   ///< always: a transport on a device without them is not constructed
};

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
  // ---- control-channel limits: each checked before anything is allocated from what a peer said
  /// Receivers: handshakes run at once (each bounded by connect_timeout), counting those
  /// ended whose result no async_accept took yet; past it further peers wait in the listen
  /// backlog. A silent peer holds one of these, never the listener.
  std::size_t max_pending_handshakes = shardline::detail::default_max_pending_handshakes;
  /// Receivers: the most queue pairs a sender may ask for (errc::protocol_error past it).
  std::uint32_t max_queue_pairs = 64;
  /// Senders: the most bytes of region table accepted from a receiver (errc::protocol_error
  /// past it).
  std::uint64_t max_table_bytes = std::uint64_t(64) << 20;
  /// With windows, a receiver registers its memory without remote access (local write and
  /// MW bind only) and gives each sender, once admitted, rkeys of its own: one type 2 memory
  /// window per registration per QP, bound to the receiver's QP that the sender's QP is
  /// connected to, so a key works on that QP alone, and deallocated (revoked) when the sender
  /// leaves or is dropped. Without, the rkeys are the memory regions' own (remote write),
  /// good on any QP of the receiver's device until the receiver goes. `required` on a device
  /// without type 2 windows: the transport's constructor throws errc::no_device. Senders
  /// follow whichever the receiver chose.
  memory_window_use memory_windows = memory_window_use::automatic;
  /// Registers what ibv_reg_mr cannot: cuda_device memory, through dma-buf. Set by the CUDA
  /// part where the platform can (shardline/cuda/gpudirect.hpp, cuda::use_gpu_memory); called
  /// with the transport's device, the bytes, where they live and the access flags, it returns
  /// their region or throws shardline::error. With it, register_memory() and the receiver's
  /// expose() take cuda_device memory too (readable_kinds(), exposable_kinds()); unset, they
  /// refuse it (errc::unsupported_memory).
  std::function<memory_region(const std::shared_ptr<verbs::device>&, std::span<std::byte>, memory_location, int access)>
      register_device_memory;
};

}  // namespace shardline::verbs
