// shardline/transport/detail/control_link.hpp: the control socket after the handshake, the
// same for every transport that has one:
//   sender side (notice_link): writes notice frames in the order given, matches each echoed
//     ack against the oldest frame not yet acknowledged, and reads for the socket's whole
//     life so that the receiver's end is seen even by an idle sender;
//   receiver side (serve_notices / acknowledge_notice): reads one frame at a time from a
//     sender, hands the notice to the receiver, echoes the frame once the receiver holds it,
//     and reports the sender's end.
// Every failure of the socket (end of file, reset, a failed write) is errc::peer_disconnected;
// a frame that is not what the protocol allows is errc::protocol_error. Each is reported once.
// A seal policy binds every frame to the authenticated session: network transports seal
// with notice_seal (transport/detail/psk_auth.hpp: each frame followed by its tag, a frame
// whose tag fails is errc::authentication_failed and never reaches the receiver's logic);
// no_seal, the default, sends bare frames (shm, CUDA IPC: the kernel vouches for the peer).
#pragma once

#include <shardline/error.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/detail/control.hpp>

#include <asio/buffer.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>

#include <array>
#include <cerrno>
#include <cstdint>
#include <deque>
#include <memory>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <poll.h>
#include <sys/socket.h>

namespace shardline::detail {

/// The seal policy of a control link whose frames go bare.
struct no_seal {
  static constexpr bool seals = false;
};

// What one frame reads into: the frame, then its tag when sealed (as many bytes as the seal
// says: none when it holds no key).
template <class Seal>
auto sealed_frame_in(notice_frame& frame, Seal& seal) {
  if constexpr (Seal::seals)
    return std::array{asio::buffer(frame), asio::buffer(seal.in_tag().data(), seal.in_tag().size())};
  else
    return asio::buffer(frame);
}

/// The sender's end of a control socket. `Listener` (which owns this link and is held by a
/// shared_ptr) hears of it through
///   void notice_acknowledged(std::uint64_t tag)  — the ack of the frame sent with `tag`;
///   void control_ended(std::error_code why)      — once, when the link fails (not on close()).
/// Handlers hold the listener weakly: a listener that is gone stops the link.
/// `Seal` (no_seal, or notice_seal): set with seal() before the first send() and watch().
template <class Socket, class Listener, class Seal = no_seal>
class notice_link {
public:
  explicit notice_link(Socket socket) : socket_(std::move(socket)) {}

  Socket& socket() noexcept { return socket_; }
  Seal& seal() noexcept { return seal_; }
  bool is_open() const noexcept { return !ended_; }

  /// Starts reading acks (and the receiver's end), for the link's life.
  void watch(std::weak_ptr<Listener> listener) {
    listener_ = std::move(listener);
    read_ack();
  }

  /// Writes `frame` after every frame sent before; its ack is reported with `tag`.
  void send(const notice_frame& frame, std::uint64_t tag) {
    if (ended_) return;
    outbox_.insert(outbox_.end(), frame.begin(), frame.end());
    if constexpr (Seal::seals) {
      const auto t = seal_.seal(frame);
      outbox_.insert(outbox_.end(), t.begin(), t.end());
    }
    awaiting_.push_back({frame, tag});
    flush();
  }

  /// Ends the link without reporting it; later sends are dropped.
  void close() noexcept {
    ended_ = true;
    std::error_code ignored;
    socket_.close(ignored);
  }

private:
  struct sent_frame {
    notice_frame frame;
    std::uint64_t tag;
  };

  // Whatever is queued goes out in one write; frames queued meanwhile wait for the next.
  void flush() {
    if (writing_ || outbox_.empty() || ended_) return;
    writing_ = true;
    wire_.assign(outbox_.begin(), outbox_.end());
    outbox_.clear();
    asio::async_write(socket_, asio::buffer(wire_), [w = listener_, this](std::error_code ec, std::size_t) {
      auto listener = w.lock();
      if (!listener) return;
      writing_ = false;
      if (ended_) return;
      if (ec) return end(*listener, make_error_code(errc::peer_disconnected));
      flush();
    });
  }

  void read_ack() {
    asio::async_read(socket_, sealed_frame_in(ack_, seal_), [w = listener_, this](std::error_code ec, std::size_t) {
      auto listener = w.lock();
      if (!listener || ended_) return;
      if (ec) return end(*listener, make_error_code(errc::peer_disconnected));
      if constexpr (Seal::seals)
        if (!seal_.open(ack_)) return end(*listener, make_error_code(errc::authentication_failed));
      if (awaiting_.empty() || awaiting_.front().frame != ack_)
        return end(*listener, make_error_code(errc::protocol_error));
      const auto tag = awaiting_.front().tag;
      awaiting_.pop_front();
      read_ack();
      listener->notice_acknowledged(tag);
    });
  }

  void end(Listener& listener, std::error_code why) {
    close();
    outbox_.clear();
    awaiting_.clear();
    listener.control_ended(why);
  }

  Socket socket_;
  std::weak_ptr<Listener> listener_;
  std::vector<std::byte> outbox_;      // not written yet: frames (each with its tag when sealed)
  std::vector<std::byte> wire_;        // being written
  std::deque<sent_frame> awaiting_;    // oldest first
  notice_frame ack_{};
  [[no_unique_address]] Seal seal_;
  bool writing_ = false;
  bool ended_ = false;
};

/// The receiver's end of one sender's control socket. A transport's peer type derives from
/// it (or has these members; `seal` is optional: without it frames go bare). `Seal`
/// (no_seal, or notice_seal): set before serve_notices.
template <class Socket, class Seal = no_seal>
struct notice_source {
  explicit notice_source(Socket s) : socket(std::move(s)) {}
  Socket socket;
  std::uint32_t sender = 0;
  notice_frame frame{};  // the frame read last, echoed as its ack
  [[no_unique_address]] Seal seal;
};

/// Whether a peer type seals its frames.
template <class Peer>
constexpr bool seals_notices() {
  if constexpr (requires(Peer& p) { p.seal; }) return std::remove_cvref_t<decltype(std::declval<Peer&>().seal)>::seals;
  else return false;
}

template <class Listener, class Peer>
void acknowledge_notice(std::weak_ptr<Listener> listener, std::shared_ptr<Peer> peer);

/// Where the connection of a sender stands when the same sender id says hello again (a
/// restarted sender can be back before its predecessor's end was read).
enum class predecessor {
  alive,    ///< still connected: the newcomer is refused
  gone,     ///< hung up and nothing it sent is left unread: retire it, admit the newcomer
  leaving,  ///< hung up with notices still unread: ask again once they are read
};

/// Probes a connected stream socket without blocking or consuming anything.
inline predecessor probe_predecessor(int socket) noexcept {
  char byte;
  ssize_t n;
  do n = ::recv(socket, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) return predecessor::gone;
  ::pollfd p{socket, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) return predecessor::leaving;
  return predecessor::alive;
}

/// Reads `peer`'s next notice. `Listener` hears, through
///   bool serving(const Peer&)                                — false once it dropped the peer
///                                                              (or closed): the loop ends quietly;
///   bool notice_arrived(const std::shared_ptr<Peer>&, notice) — true when the receiver holds
///                                                              it now (echo now), false when it
///                                                              will call acknowledge_notice later;
///   void sender_left(const std::shared_ptr<Peer>&, std::error_code) — the socket ended
///                                                              (peer_disconnected), carried
///                                                              garbage (protocol_error) or a
///                                                              frame whose seal fails
///                                                              (authentication_failed).
template <class Listener, class Peer>
void serve_notices(std::weak_ptr<Listener> listener, std::shared_ptr<Peer> peer) {
  auto& p = *peer;
  auto in = [&p] {
    if constexpr (seals_notices<Peer>()) return sealed_frame_in(p.frame, p.seal);
    else return asio::buffer(p.frame);
  }();
  asio::async_read(p.socket, in,
                   [w = std::move(listener), peer = std::move(peer)](std::error_code ec, std::size_t) mutable {
                     auto l = w.lock();
                     if (!l || !l->serving(*peer)) return;
                     if (ec) return l->sender_left(peer, make_error_code(errc::peer_disconnected));
                     if constexpr (seals_notices<Peer>())
                       if (!peer->seal.open(peer->frame))
                         return l->sender_left(peer, make_error_code(errc::authentication_failed));
                     notice n;
                     if (auto bad = decode_notice(peer->frame, peer->sender, n)) return l->sender_left(peer, bad);
                     if (l->notice_arrived(peer, n)) acknowledge_notice(std::move(w), std::move(peer));
                   });
}

/// Echoes `peer`'s last frame (sealed, when it seals), then reads its next.
template <class Listener, class Peer>
void acknowledge_notice(std::weak_ptr<Listener> listener, std::shared_ptr<Peer> peer) {
  auto& p = *peer;
  auto out = [&p] {
    if constexpr (seals_notices<Peer>()) {
      const auto t = p.seal.seal(p.frame);  // the seal's own buffer: ours until this write ends
      return std::array{asio::const_buffer(p.frame.data(), p.frame.size()), asio::const_buffer(t.data(), t.size())};
    } else {
      return asio::buffer(p.frame);
    }
  }();
  asio::async_write(p.socket, out,
                    [w = std::move(listener), peer = std::move(peer)](std::error_code ec, std::size_t) mutable {
                      auto l = w.lock();
                      if (!l || !l->serving(*peer)) return;
                      if (ec) return l->sender_left(peer, make_error_code(errc::peer_disconnected));
                      serve_notices(std::move(w), std::move(peer));
                    });
}

}  // namespace shardline::detail
