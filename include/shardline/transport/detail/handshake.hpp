// shardline/transport/detail/handshake.hpp: the handshake every transport with a control
// socket runs (shm over a Unix socket, verbs over TCP), as two composed operations over any
// stream socket, each bounded by one deadline:
//   sender:   connect, hello ->, [proof of the key], <- verdict, then the transport's own exchange;
//   receiver: accept, <- hello, [proof of the key], judge it, verdict ->, then the transport's
//             own exchange.
// The proof of the key (transport/detail/psk_auth.hpp) runs when the caller passes a key:
// network transports do; shm, whose peers the kernel vouches for (SO_PEERCRED), does not, and
// its handshake instantiates no key code (nor needs libsodium).
// With a key, a peer that has not proved it is neither judged nor told a verdict. Once both
// proofs held, the handshake hands the connection's session key (psk_session::
// derive_session_key) to the exchange (sender) or the hooks (receiver) when they have
// `authenticated(session_key)`: the transport seals its control link with it.
// Frames are transport/detail/control.hpp's and psk_auth.hpp's; nothing here allocates from a
// length the peer chose. What a later protocol adds to every transport goes into these two
// operations.
// A receiver does not accept and handshake one peer at a time: handshake_listener and
// accept_peers (below) accept peers as they come and run their handshakes
// (async_handshake_accepted) side by side, at most max_pending_handshakes at once, so a silent
// peer holds only its own handshake, never the listener.
#pragma once

#include <shardline/error.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/detail/control.hpp>

#include <asio/basic_waitable_timer.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>

#include <shardline/transport/detail/erased_op.hpp>

#include <asio/associated_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <deque>
#include <type_traits>
#include <vector>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string_view>
#include <system_error>
#include <utility>

namespace shardline::detail {

using verdict_frame = std::array<std::byte, verdict_bytes>;

/// A handshake's socket error as its caller sees it: every way of seeing the peer go
/// (end of file, reset, broken pipe) is errc::peer_disconnected; anything else as it is.
/// Other errors keep their category (callers compare with Asio's codes, e.g. timed_out).
inline std::error_code handshake_error(std::error_code ec) noexcept {
  // Asio's "asio.system" category knows no std::errc equivalents: compare in the system one.
  const std::error_code sys =
      ec.category() == asio::error::get_system_category() ? std::error_code(ec.value(), std::system_category()) : ec;
  if (ec == asio::error::eof || sys == std::errc::connection_reset || sys == std::errc::broken_pipe)
    return make_error_code(errc::peer_disconnected);
  return ec;
}

/// What the receiver's judge says of a hello it could parse: admitted (no refusal), refused,
/// or, with `retry`, "ask again after the event loop had a turn" (a predecessor of the same
/// sender still has unread notices); a judge asked too often gets its refusal.
struct judgement {
  std::error_code refusal;
  bool retry = false;
};

/// How often a receiver's handshake asks a judge again that said `retry`.
inline constexpr unsigned max_judge_retries = 64;

/// The proof step of a handshake that proves no key. A key type names its proof as
/// `Key::proof` (shared_key: psk_session, transport/detail/psk_auth.hpp): constructed from the
/// key, it holds `challenge`, `proof` and `answer` frames, and makes and checks them.
struct no_key_proof {
  static constexpr bool proves_key = false;
};

/// One handshake's deadline and frames, at a stable address while the operation moves.
/// When the deadline passes the socket is closed: the pending step fails, and the handshake
/// reports asio::error::timed_out instead of that failure.
template <class Socket, class Proof = no_key_proof>
class handshake_state {
  using timer_type = asio::basic_waitable_timer<std::chrono::steady_clock,
                                                asio::wait_traits<std::chrono::steady_clock>,
                                                typename Socket::executor_type>;
  struct clock {
    bool expired = false;
    bool over = false;
  };

public:
  explicit handshake_state(std::shared_ptr<Socket> s) : socket(std::move(s)), timer_(socket->get_executor()) {}

  void arm(std::chrono::steady_clock::duration timeout) {
    timer_.expires_after(timeout);
    timer_.async_wait([c = clock_, w = std::weak_ptr<Socket>(socket)](std::error_code ec) {
      if (ec || c->over) return;
      c->expired = true;
      if (auto s = w.lock()) {
        std::error_code ignored;
        s->close(ignored);
      }
    });
  }

  // The result the caller sees; a failed handshake leaves the socket closed.
  std::error_code end(std::error_code ec) {
    clock_->over = true;
    timer_.cancel();
    if (clock_->expired) ec = asio::error::timed_out;
    else ec = handshake_error(ec);
    if (ec) {
      std::error_code ignored;
      socket->close(ignored);
    }
    return ec;
  }

  std::shared_ptr<Socket> socket;
  std::string_view magic;
  hello_frame hello{};
  verdict_frame verdict{};
  sender_identity who;
  std::error_code refusal;
  std::optional<Proof> psk;  // engaged when the handshake proves a key

private:
  timer_type timer_;
  // Shared with the timer's handler, which may run after the handshake ended.
  std::shared_ptr<clock> clock_ = std::make_shared<clock>();
};

// The error a handshake step resumes with: its own, or operation_aborted once the handler's
// slot emitted a cancellation. Any type ends a handshake (there is no partial result worth
// keeping), so the first step lets every type through. (Asio 1.22's composed_op keeps
// cancelled() protected; its state is public.)
template <class Self>
std::error_code handshake_step(Self& self, std::error_code ec, bool first) {
  if (first) self.reset_cancellation_state(asio::enable_total_cancellation());
  else if (!ec && self.get_cancellation_state().cancelled() != asio::cancellation_type::none)
    ec = asio::error::operation_aborted;
  return ec;
}

// What a keyed sender makes of 4 bytes where a challenge belongs: a receiver that does not
// authenticate answers with its verdict; anything else is garbage.
inline std::error_code not_a_challenge(const verdict_frame& lead) {
  return get_le<std::uint32_t>(lead.data()) <= static_cast<std::uint32_t>(last_errc)
             ? make_error_code(errc::authentication_failed)
             : make_error_code(errc::protocol_error);
}

template <class Socket, class Exchange, class Proof>
struct sender_handshake_op {
  enum class step { start, connected, hello_sent, lead_read, challenge_read, proof_sent, answer_read, verdict_read,
                    exchanged };

  std::unique_ptr<handshake_state<Socket, Proof>> d;
  typename Socket::endpoint_type peer;
  std::chrono::steady_clock::duration timeout;
  Exchange exchange;
  step at = step::start;

  template <class Self>
  void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
    ec = handshake_step(self, ec, at == step::start);
    switch (at) {
      case step::start:
        d->arm(timeout);
        at = step::connected;
        return d->socket->async_connect(peer, std::move(self));
      case step::connected:
        if (ec) return finish(self, ec);
        at = step::hello_sent;
        return asio::async_write(*d->socket, asio::buffer(d->hello), std::move(self));
      case step::hello_sent:
        if (ec) return finish(self, ec);
        // Keyed: the first 4 bytes open the receiver's challenge, or are a keyless receiver's
        // verdict (read into the verdict's frame either way).
        at = d->psk ? step::lead_read : step::verdict_read;
        return asio::async_read(*d->socket, asio::buffer(d->verdict), std::move(self));
      case step::lead_read:
      case step::challenge_read:
      case step::proof_sent:
      case step::answer_read:
        if constexpr (Proof::proves_key) return prove(self, ec);
        else return finish(self, make_error_code(errc::protocol_error));  // never: no steps to prove a key
      case step::verdict_read: {
        if (ec) return finish(self, ec);
        // Keyless, facing a receiver that asks for a key.
        if constexpr (Proof::proves_key)
          if (!d->psk && Proof::opens_challenge(d->verdict))
            return finish(self, make_error_code(errc::authentication_failed));
        if (auto refusal = decode_verdict(d->verdict)) return finish(self, refusal);
        at = step::exchanged;
        auto x = exchange;  // `self` (and this op with it) moves into the exchange
        return x(*d->socket, std::move(self));
      }
      case step::exchanged:
        return finish(self, ec);
    }
  }

  // Challenge in, proof out, the receiver's answer in; then the verdict.
  template <class Self>
  void prove(Self& self, std::error_code ec) {
    if (ec) return finish(self, ec);
    auto& p = *d->psk;
    switch (at) {
      case step::lead_read:
        // Nothing goes out to a receiver that does not authenticate: not even our proof.
        if (!Proof::opens_challenge(d->verdict)) return finish(self, not_a_challenge(d->verdict));
        std::memcpy(p.challenge.data(), d->verdict.data(), d->verdict.size());
        at = step::challenge_read;
        return asio::async_read(*d->socket, asio::buffer(p.challenge) + d->verdict.size(), std::move(self));
      case step::challenge_read:
        p.make_proof(d->magic, d->hello);
        at = step::proof_sent;
        return asio::async_write(*d->socket, asio::buffer(p.proof), std::move(self));
      case step::proof_sent:
        at = step::answer_read;
        return asio::async_read(*d->socket, asio::buffer(p.answer), std::move(self));
      case step::answer_read:
        if (auto failed = p.check_answer(d->magic, d->hello)) return finish(self, failed);
        if constexpr (requires(Exchange& x) { x.authenticated(p.derive_session_key(d->magic)); })
          exchange.authenticated(p.derive_session_key(d->magic));
        at = step::verdict_read;
        return asio::async_read(*d->socket, asio::buffer(d->verdict), std::move(self));
      default:
        return finish(self, make_error_code(errc::protocol_error));  // never
    }
  }

  template <class Self>
  void finish(Self& self, std::error_code ec) {
    ec = d->end(ec);
    self.complete(ec);
  }
};

/// The sender's handshake on `socket` (owned by the caller; an aliasing shared_ptr into the
/// caller's state is fine): connects to `peer`, says hello as `who` in `magic`'s dialect,
/// with a `key` proves it holds that key and checks that the receiver holds it too, reads
/// the verdict and, when admitted, runs `exchange(socket, handler)`, the transport's own
/// part, an asynchronous operation completing with void(std::error_code). All of it is
/// bounded by `timeout`. Completion void(std::error_code): the receiver's refusal,
/// errc::authentication_failed (with a key: the receiver holds another key, or none, or
/// its proof does not hold; without one: the receiver asks for a key), a socket error
/// (errc::peer_disconnected for the peer going), asio::error::timed_out, the exchange's
/// error, or operation_aborted when the handler's slot emits any cancellation.
/// The handler's executor, allocator and cancellation slot are the handshake's (async_compose).
/// `Key`: shared_key (transport/detail/psk_auth.hpp); an empty optional runs no proof, but
/// still tells a receiver that asks for one (authentication_failed).
template <class Socket, class Key, class Exchange, class Token>
auto async_handshake_as_sender(std::shared_ptr<Socket> socket, typename Socket::endpoint_type peer,
                               std::string_view magic, const sender_identity& who,
                               std::chrono::steady_clock::duration timeout, const std::optional<Key>& key,
                               Exchange exchange, Token&& token) {
  using proof = typename Key::proof;
  auto d = std::make_unique<handshake_state<Socket, proof>>(socket);
  d->magic = magic;
  d->hello = encode_hello(magic, who);
  d->who = who;
  if (key) d->psk.emplace(*key);
  auto ex = socket->get_executor();
  return asio::async_compose<Token, void(std::error_code)>(
      sender_handshake_op<Socket, Exchange, proof>{std::move(d), std::move(peer), timeout, std::move(exchange)},
      token, ex);
}

/// The sender's handshake without a key: for transports whose peers are vouched for another
/// way (shm: the kernel's SO_PEERCRED).
template <class Socket, class Exchange, class Token>
auto async_handshake_as_sender(std::shared_ptr<Socket> socket, typename Socket::endpoint_type peer,
                               std::string_view magic, const sender_identity& who,
                               std::chrono::steady_clock::duration timeout, Exchange exchange, Token&& token) {
  auto d = std::make_unique<handshake_state<Socket>>(socket);
  d->magic = magic;
  d->hello = encode_hello(magic, who);
  d->who = who;
  auto ex = socket->get_executor();
  return asio::async_compose<Token, void(std::error_code)>(
      sender_handshake_op<Socket, Exchange, no_key_proof>{std::move(d), std::move(peer), timeout,
                                                          std::move(exchange)},
      token, ex);
}

template <class Acceptor, class Socket, class Hooks, class Proof>
struct receiver_handshake_op {
  enum class step { start, accepted, hello_read, challenge_sent, proof_read, answer_sent, judged, verdict_sent,
                    exchanged };

  Acceptor* acceptor;  // null: the socket is accepted already
  std::unique_ptr<handshake_state<Socket, Proof>> d;
  std::chrono::steady_clock::duration timeout;
  Hooks hooks;
  step at = step::start;
  unsigned retries = 0;

  template <class Self>
  void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
    ec = handshake_step(self, ec, at == step::start);
    switch (at) {
      case step::start:
        at = step::accepted;
        if constexpr (std::is_void_v<Acceptor>) return (*this)(self);  // the caller accepted it already
        else return acceptor->async_accept(*d->socket, std::move(self));
      case step::accepted:
        if (ec) return finish(self, ec);
        // The deadline starts once a peer is there: a slow one cannot hold up those behind it,
        // and an idle listener never times out.
        d->arm(timeout);
        at = step::hello_read;
        return asio::async_read(*d->socket, asio::buffer(d->hello), std::move(self));
      case step::hello_read:
        if (ec) return finish(self, ec);
        if constexpr (Proof::proves_key)
          if (d->psk) return prove(self, ec);
        return judge_hello(self);
      case step::challenge_sent:
      case step::proof_read:
      case step::answer_sent:
        if constexpr (Proof::proves_key) return prove(self, ec);
        else return finish(self, make_error_code(errc::protocol_error));  // never: no steps to prove a key
      case step::judged:
        if (ec) return finish(self, ec);
        return judge(self);
      case step::verdict_sent: {
        // A refused peer reads its verdict, then end of file.
        if (d->refusal) return finish(self, d->refusal);
        if (ec) return finish(self, ec);
        at = step::exchanged;
        auto x = hooks;  // `self` (and this op with it) moves into the exchange
        return x(*d->socket, d->who, std::move(self));
      }
      case step::exchanged:
        return finish(self, ec);
    }
  }

  // Whatever the hello says, the peer hears nothing but a challenge until it proved the key:
  // the hello is judged only then (the MACs cover it as it came).
  template <class Self>
  void prove(Self& self, std::error_code ec) {
    auto& p = *d->psk;
    switch (at) {
      case step::hello_read:
        p.make_challenge();
        at = step::challenge_sent;
        return asio::async_write(*d->socket, asio::buffer(p.challenge), std::move(self));
      case step::challenge_sent:
        if (ec) return finish(self, ec);
        at = step::proof_read;
        return asio::async_read(*d->socket, asio::buffer(p.proof), std::move(self));
      case step::proof_read:
        if (ec) return finish(self, ec);
        d->refusal = p.check_proof(d->magic, d->hello);
        at = step::answer_sent;
        return asio::async_write(*d->socket, asio::buffer(p.answer), std::move(self));
      case step::answer_sent:
        // A peer without the key reads a failed status, then end of file.
        if (d->refusal) return finish(self, d->refusal);
        if (ec) return finish(self, ec);
        if constexpr (requires(Hooks& h) { h.authenticated(p.derive_session_key(d->magic)); })
          hooks.authenticated(p.derive_session_key(d->magic));
        return judge_hello(self);
      default:
        return finish(self, make_error_code(errc::protocol_error));  // never
    }
  }

  template <class Self>
  void judge_hello(Self& self) {
    d->refusal = decode_hello(d->magic, d->hello, d->who);
    judge(self);
  }

  template <class Self>
  void judge(Self& self) {
    if (!d->refusal) {
      const judgement j = hooks.judge(d->who);
      if (j.retry && retries++ < max_judge_retries) {
        at = step::judged;
        return asio::post(d->socket->get_executor(), std::move(self));
      }
      d->refusal = j.refusal;
    }
    d->verdict = encode_verdict(d->refusal);
    at = step::verdict_sent;
    asio::async_write(*d->socket, asio::buffer(d->verdict), std::move(self));
  }

  template <class Self>
  void finish(Self& self, std::error_code ec) {
    ec = d->end(ec);
    const sender_identity who = d->who;
    self.complete(ec, who);
  }
};

/// The receiver's handshake: accepts one peer from `acceptor` into `socket`, reads its
/// hello in `magic`'s dialect; with a `key`, challenges the peer to prove it holds that key
/// (and, once it did, proves the same); asks `hooks.judge(identity)` (a judgement), answers
/// with the verdict and, when admitted, runs `hooks(socket, identity, handler)`, the
/// transport's own part, completing with void(std::error_code). With a key, a peer that
/// does not prove it receives the challenge and a failed status, nothing else. Everything
/// after the accept is bounded by `timeout`. Completion void(std::error_code,
/// sender_identity), the identity as the hello said (zero when it did not parse, or the
/// peer did not prove the key): errc::authentication_failed for a proof that does not hold,
/// errc::protocol_error or protocol_version_mismatch for a hello that is not one, the
/// judge's refusal, a socket error (errc::peer_disconnected for the peer going),
/// asio::error::timed_out, the exchange's error, or operation_aborted when the handler's
/// slot emits any cancellation. A failed handshake leaves the socket closed.
/// `Key`: shared_key (transport/detail/psk_auth.hpp); an empty optional runs no proof.
template <class Acceptor, class Socket, class Key, class Hooks, class Token>
auto async_handshake_as_receiver(Acceptor& acceptor, std::shared_ptr<Socket> socket, std::string_view magic,
                                 std::chrono::steady_clock::duration timeout, const std::optional<Key>& key,
                                 Hooks hooks, Token&& token) {
  using proof = typename Key::proof;
  auto ex = socket->get_executor();
  auto d = std::make_unique<handshake_state<Socket, proof>>(std::move(socket));
  d->magic = magic;
  if (key) d->psk.emplace(*key);
  return asio::async_compose<Token, void(std::error_code, sender_identity)>(
      receiver_handshake_op<Acceptor, Socket, Hooks, proof>{&acceptor, std::move(d), timeout, std::move(hooks)},
      token, ex);
}

/// The receiver's handshake without a key: for transports whose peers are vouched for
/// another way (shm: the kernel's SO_PEERCRED).
template <class Acceptor, class Socket, class Hooks, class Token>
auto async_handshake_as_receiver(Acceptor& acceptor, std::shared_ptr<Socket> socket, std::string_view magic,
                                 std::chrono::steady_clock::duration timeout, Hooks hooks, Token&& token) {
  auto ex = socket->get_executor();
  auto d = std::make_unique<handshake_state<Socket>>(std::move(socket));
  d->magic = magic;
  return asio::async_compose<Token, void(std::error_code, sender_identity)>(
      receiver_handshake_op<Acceptor, Socket, Hooks, no_key_proof>{&acceptor, std::move(d), timeout,
                                                                   std::move(hooks)},
      token, ex);
}

/// The receiver's handshake on a socket the caller accepted already (see handshake_listener):
/// the same as async_handshake_as_receiver from the hello on, the deadline armed now.
template <class Socket, class Key, class Hooks, class Token>
auto async_handshake_accepted(std::shared_ptr<Socket> socket, std::string_view magic,
                              std::chrono::steady_clock::duration timeout, const std::optional<Key>& key,
                              Hooks hooks, Token&& token) {
  using proof = typename Key::proof;
  using acceptor_type = void;
  auto ex = socket->get_executor();
  auto d = std::make_unique<handshake_state<Socket, proof>>(std::move(socket));
  d->magic = magic;
  if (key) d->psk.emplace(*key);
  return asio::async_compose<Token, void(std::error_code, sender_identity)>(
      receiver_handshake_op<acceptor_type, Socket, Hooks, proof>{nullptr, std::move(d), timeout, std::move(hooks)},
      token, ex);
}

/// The same without a key (shm, CUDA IPC: peers vouched for by the kernel).
template <class Socket, class Hooks, class Token>
auto async_handshake_accepted(std::shared_ptr<Socket> socket, std::string_view magic,
                              std::chrono::steady_clock::duration timeout, Hooks hooks, Token&& token) {
  using acceptor_type = void;
  auto ex = socket->get_executor();
  auto d = std::make_unique<handshake_state<Socket>>(std::move(socket));
  d->magic = magic;
  return asio::async_compose<Token, void(std::error_code, sender_identity)>(
      receiver_handshake_op<acceptor_type, Socket, Hooks, no_key_proof>{nullptr, std::move(d), timeout,
                                                                        std::move(hooks)},
      token, ex);
}

/// A receiver's accepting, shared by every transport with a listening socket: peers are
/// accepted as they come and their handshakes run side by side, so a silent or slow peer
/// holds only its own handshake (bounded by the handshake's deadline), never the listener.
/// Each async_accept of the transport takes the result of the next handshake to end, in the
/// order they end. At most `limit` handshakes are running or ended and not yet taken; past it
/// the listener accepts nothing until one is taken, and further peers wait in the kernel's
/// backlog: a burst of legitimate senders (every rank of a trainer connecting at once) is
/// served in turn instead of refused. Once started (the first async_accept), it accepts
/// until close().
///
/// Also hands out sender ids to handshakes in progress (claim): two handshakes claiming the
/// same id at once cannot both be admitted.
///
/// Used from the transport's executor only.
template <class Executor, class Socket>
class handshake_listener : public std::enable_shared_from_this<handshake_listener<Executor, Socket>> {
public:
  using waiter = erased_op<std::error_code, std::uint32_t>;

  handshake_listener(const Executor& ex, std::size_t limit) : executor_(ex), limit_(limit ? limit : 1) {}

  /// Whether an accept may start now.
  bool may_accept() const noexcept {
    return !closed_ && !accepting_ && !paused_ && running_.size() + ended_.size() < limit_;
  }
  bool closed() const noexcept { return closed_; }
  /// Whether some async_accept waits for a result.
  bool waiting() const noexcept { return !waiters_.empty(); }
  std::size_t running() const noexcept { return running_.size(); }

  void accept_started() noexcept { accepting_ = true; }

  /// The accept itself failed (not a peer's fault: e.g. out of descriptors): reported to the
  /// next async_accept; nothing more is accepted until it was.
  void accept_failed(std::error_code ec) {
    accepting_ = false;
    if (closed_) return;
    paused_ = true;
    ended_.push_back({ec, 0, true});
    deliver();
  }

  /// A peer was accepted into `socket`: its handshake runs from now.
  void handshake_started(const std::shared_ptr<Socket>& socket) {
    accepting_ = false;
    running_.push_back({socket.get(), socket, std::nullopt});
  }

  /// The handshake on `socket` ended with `ec` (its transport's final say) for `sender`.
  void handshake_ended(const Socket* socket, std::error_code ec, std::uint32_t sender) {
    const auto it = find(socket);
    if (it != running_.end()) running_.erase(it);
    if (closed_) return;
    ended_.push_back({ec, sender, false});
    deliver();
  }

  /// Claims `sender` for the handshake on `socket` until that handshake ends: false when
  /// another handshake in progress claimed it.
  bool claim(const Socket* socket, std::uint32_t sender) {
    for (const auto& r : running_)
      if (r.key != socket && r.claimed == sender) return false;
    if (const auto it = find(socket); it != running_.end()) it->claimed = sender;
    return true;
  }

  /// Hands the next result to `handler` (void(std::error_code, std::uint32_t)), never
  /// inline: now if one is there, else once a handshake ends. Cancellable (any type).
  template <class Handler>
  void take(Handler&& handler) {
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto h = make_op<waiter>(std::forward<Handler>(handler), executor_);
    if (closed_) return complete_op(std::move(h), asio::error::operation_aborted, std::uint32_t{0});
    waiter* raw = h.get();
    waiters_.push_back({std::move(h), slot});
    if (slot.is_connected()) slot.template emplace<canceller>(canceller{this->weak_from_this(), raw});
    deliver();
  }

  /// Stops: closes every handshake in progress (each fails), completes every waiter with
  /// operation_aborted; results not taken are dropped.
  void close() noexcept {
    if (closed_) return;
    closed_ = true;
    std::error_code ignored;
    for (auto& r : running_)
      if (auto s = r.socket.lock()) s->close(ignored);
    ended_.clear();
    while (!waiters_.empty()) complete_op(pop_waiter(), asio::error::operation_aborted, std::uint32_t{0});
  }

private:
  struct handshake {
    const Socket* key;
    std::weak_ptr<Socket> socket;
    std::optional<std::uint32_t> claimed;
  };
  struct result {
    std::error_code ec;
    std::uint32_t sender;
    bool accept_failure;
  };
  struct pending {
    op_ptr<waiter> handler;
    asio::cancellation_slot slot;
  };
  struct canceller {
    std::weak_ptr<handshake_listener> listener;
    waiter* w;
    void operator()(asio::cancellation_type type) const {
      if (type == asio::cancellation_type::none) return;
      if (auto l = listener.lock()) l->cancel(w);
    }
  };

  typename std::vector<handshake>::iterator find(const Socket* key) {
    return std::find_if(running_.begin(), running_.end(), [key](const handshake& h) { return h.key == key; });
  }

  void deliver() {
    while (!waiters_.empty() && !ended_.empty()) {
      const result r = ended_.front();
      ended_.pop_front();
      if (r.accept_failure) paused_ = false;
      complete_op(pop_waiter(), r.ec, r.sender);
    }
  }

  void cancel(waiter* w) {
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it)
      if (it->handler.get() == w) {
        auto h = std::move(it->handler);
        it->slot.clear();
        waiters_.erase(it);
        return complete_op(std::move(h), asio::error::operation_aborted, std::uint32_t{0});
      }
  }

  op_ptr<waiter> pop_waiter() {
    auto p = std::move(waiters_.front());
    waiters_.pop_front();
    if (p.slot.is_connected()) p.slot.clear();
    return std::move(p.handler);
  }

  Executor executor_;
  std::size_t limit_;
  std::vector<handshake> running_;
  std::deque<result> ended_;
  std::deque<pending> waiters_;
  bool accepting_ = false;
  bool paused_ = false;
  bool closed_ = false;
};

/// Keeps a receiver accepting: accepts one peer, starts its handshake and accepts the next at
/// once, as long as its handshake_listener has room. `Driver` (copied into every handler)
/// is the transport's part:
///   std::shared_ptr<State> lock() const                  — the receiver, or null once gone;
///   handshake_listener<...>& listener(State&) const;
///   Acceptor& acceptor(State&) const;
///   std::shared_ptr<Pending> make_pending(State&) const  — a handshake's state, with `socket`;
///   void handshake(State&, std::shared_ptr<Pending>, Done) const — runs
///                                       async_handshake_accepted with the transport's hooks;
///   std::error_code admit(State&, const std::shared_ptr<Pending>&, std::error_code,
///                         sender_identity) const — the handshake ended (or its accept
///                                       failed): installs the sender or drops the peer; the
///                                       result async_accept reports.
/// Call it whenever room may have appeared: after an async_accept took a result.
template <class Driver>
void accept_peers(Driver driver) {
  const auto state = driver.lock();
  if (!state) return;
  auto& listener = driver.listener(*state);
  if (!listener.may_accept()) return;
  auto pending = driver.make_pending(*state);
  listener.accept_started();
  driver.acceptor(*state).async_accept(pending->socket, [driver, pending](std::error_code ec) {
    const auto state = driver.lock();
    if (!state) return;
    auto& listener = driver.listener(*state);
    if (ec || listener.closed()) {
      const auto reported = driver.admit(*state, pending, ec ? ec : asio::error::operation_aborted, {});
      return listener.accept_failed(reported);
    }
    std::shared_ptr<std::remove_reference_t<decltype(pending->socket)>> socket(pending, &pending->socket);
    listener.handshake_started(socket);
    driver.handshake(*state, pending, [driver, pending](std::error_code ec, sender_identity who) {
      const auto state = driver.lock();
      if (!state) return;
      const auto reported = driver.admit(*state, pending, ec, who);
      driver.listener(*state).handshake_ended(&pending->socket, reported, who.sender);
      accept_peers(driver);
    });
    accept_peers(driver);
  });
}

}  // namespace shardline::detail
