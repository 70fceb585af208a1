// shardline/transport/shm/transport.hpp: processes of one host. A receiver (rollout) maps its arenas
// from memfds and hands them, over a Unix socket, to every sender (trainer) it admits; each
// sender maps them too and copies into them on worker threads, never on the io_context.
#pragma once

#include <shardline/detail/codec.hpp>
#include <shardline/detail/completion.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/detail/control_link.hpp>
#include <shardline/transport/detail/erased_op.hpp>
#include <shardline/transport/detail/expose.hpp>
#include <shardline/transport/detail/handshake.hpp>
#include <shardline/transport/shm/detail/handles.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/basic_socket_acceptor.hpp>
#include <asio/basic_stream_socket.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/thread_pool.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

namespace shardline {

/// The process at the other end of a receiver's socket, as the kernel recorded it when that
/// process connected (SO_PEERCRED): a peer cannot claim other credentials.
struct shm_peer_credentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

/// Tuning of the shm transport.
struct shm_options {
  std::size_t copy_threads = 2;                    ///< worker threads doing the memcpy
  std::size_t chunk_bytes = std::size_t(8) << 20;  ///< big writes are split so threads share them
  /// Bounds each handshake: a sender's whole async_connect, and the part of a receiver's
  /// async_accept after a peer connected (one that stalls there cannot hold up the senders
  /// queued behind it).
  std::chrono::milliseconds connect_timeout{10000};
  /// Notices a receiver queues before async_wait_notification takes them. Past it, senders'
  /// notices wait for their acknowledgement; 0: each waits for an async_wait_notification.
  std::size_t notice_depth = 64;
  /// Receivers: which processes may connect, judged from their kernel credentials once their
  /// hello arrived and before it is answered. Empty (the default): processes running as the
  /// receiver's effective uid. A refused peer gets the verdict errc::peer_not_allowed and end
  /// of file, never an arena or the region table. The socket file is created 0600 whatever
  /// this says: a peer of another uid also needs the file's permissions widened (chmod,
  /// chown) to reach the receiver at all.
  std::function<bool(const shm_peer_credentials&)> allow_peer;
  /// Senders: the most bytes of arena list and region table accepted from a receiver
  /// (errc::protocol_error past it). The buffer grows as bytes arrive, never ahead of them to
  /// the length the receiver announced.
  std::size_t max_handshake_bytes = std::size_t(1) << 30;
  /// Receivers: handshakes run at once (each bounded by connect_timeout), counting those
  /// ended whose result no async_accept took yet. Past it the receiver accepts nothing until
  /// one ends and is taken; further peers wait in the socket's backlog. A silent peer holds
  /// one of these, never the listener.
  std::size_t max_pending_handshakes = detail::default_max_pending_handshakes;
};

namespace detail {
// The Unix socket of one sender, in order:
//   sender -> receiver: hello (transport/detail/control.hpp, magic "SLSH");
//   receiver -> sender: verdict; after a refusal the receiver closes the socket;
//   receiver -> sender: a 16-byte header carrying the arena memfds as SCM_RIGHTS ("SLSH",
//     u32 arena count, u64 payload bytes), then the payload: per arena its base address in
//     the receiver and its length (u64 each), then region_table::serialize(). A region's key
//     is the index of the arena holding it;
//   then notices (sender -> receiver), each acknowledged by its 8 bytes echoed once the
//   receiver has queued it.
// The verdict and the header go out as separate messages: a read that took the verdict and
// part of the header would drop the descriptors attached to it.
inline constexpr std::string_view shm_magic = "SLSH";
inline constexpr std::size_t shm_header_bytes = 16;
// The payload is read in pieces of at most this: memory follows the bytes that arrived.
inline constexpr std::size_t shm_payload_piece = std::size_t(1) << 20;

// Asio reports syscall failures in its own "asio.system" category, which does not compare
// equal to std::errc values; ours use std::system_category. operation_aborted stays Asio's,
// as every Asio user compares with asio::error::operation_aborted.
inline std::error_code shm_system_error(std::error_code ec) noexcept {
  if (ec && ec.category() == asio::error::get_system_category() && ec != asio::error::operation_aborted)
    return {ec.value(), std::system_category()};
  return ec;
}

inline bool peer_credentials(int socket, shm_peer_credentials& out) noexcept {
  ucred c{};
  socklen_t n = sizeof c;
  if (::getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &c, &n) != 0 || n != sizeof c) return false;
  out = {c.pid, c.uid, c.gid};
  return true;
}

inline std::string describe(const shm_peer_credentials& p) {
  return "pid " + std::to_string(p.pid) + " (uid " + std::to_string(p.uid) + ", gid " + std::to_string(p.gid) + ")";
}

}  // namespace detail

/// Shared-memory transport between processes of one host: one receiver, any number of
/// senders.
///
/// Thread safety: distinct objects safe; shared objects unsafe. The transport, its
/// connections and receivers must be used from the thread (or strand) of their executor;
/// only the memcpy runs elsewhere, on the transport's own worker threads (a thread_pool of
/// options.copy_threads), which live as long as the transport or any of its connections.
template <class Executor = asio::any_io_executor>
class basic_shm_transport {
  using socket_type = asio::basic_stream_socket<asio::local::stream_protocol, Executor>;
  using acceptor_type = asio::basic_socket_acceptor<asio::local::stream_protocol, Executor>;
  using notice_channel = asio::experimental::channel<Executor, void(std::error_code, notice)>;

  static std::error_code path_error(const std::string& path) {
    if (path.empty() || path.size() >= sizeof(sockaddr_un{}.sun_path))
      return make_error_code(errc::invalid_argument);
    return {};
  }

  // ---- receiver side ------------------------------------------------------------------

  // One admitted sender's socket, read for notices until it ends.
  struct peer_state : detail::notice_source<socket_type> {
    peer_state(socket_type s, std::uint32_t id) : detail::notice_source<socket_type>(std::move(s)) {
      this->sender = id;
    }
    bool gone = false;
  };

  // A handshake in progress: its socket and what is written from it, shared with the
  // socket operations.
  struct accept_state {
    explicit accept_state(const Executor& ex) : socket(ex) {}
    socket_type socket;
    std::string payload;
    bool peer_refused = false;  // by its credentials, not by its hello
  };

  struct receiver_state : std::enable_shared_from_this<receiver_state> {
    receiver_state(const Executor& ex, std::string p, shm_options o)
        : executor(ex), path(std::move(p)), options(o), acceptor(ex), notices(ex, o.notice_depth),
          handshakes(std::make_shared<detail::handshake_listener<Executor, socket_type>>(
              ex, o.max_pending_handshakes)) {}
    struct arena {
      detail::unique_fd fd;
      detail::mapping map;
    };
    Executor executor;
    std::string path;
    shm_options options;
    acceptor_type acceptor;
    std::vector<arena> arenas;
    std::map<std::uintptr_t, std::size_t> arena_by_address;  // base -> index in arenas
    region_table table;
    admission admitted;
    notice_channel notices;
    std::unordered_map<std::uint32_t, std::shared_ptr<peer_state>> peers;  // live, by sender id
    std::shared_ptr<detail::handshake_listener<Executor, socket_type>> handshakes;
    std::string last_refusal;
    // The socket file this receiver created: the path may name another's file by the time
    // it closes (someone removed ours and a new receiver bound there), never delete that one.
    dev_t socket_device = 0;
    ino_t socket_inode = 0;
    bool path_bound = false, accepted = false, closed = false;

    void unlink_path() noexcept {
      struct stat st {};
      if (path_bound && ::lstat(path.c_str(), &st) == 0 && st.st_dev == socket_device && st.st_ino == socket_inode)
        ::unlink(path.c_str());
      path_bound = false;
    }

    // Same uid unless options.allow_peer says otherwise; credentials the kernel cannot give,
    // and a predicate that throws (inside a completion handler), refuse the peer.
    bool peer_allowed(int socket) {
      shm_peer_credentials peer;
      if (!detail::peer_credentials(socket, peer)) {
        const auto why = detail::last_system_error();
        last_refusal = "shm receiver '" + path + "': refused a peer whose credentials could not be read (SO_PEERCRED: " +
                       why.message() + ")";
        return false;
      }
      std::string verdict;
      if (!options.allow_peer) {
        if (peer.uid == ::geteuid()) return true;
        verdict = "only uid " + std::to_string(::geteuid()) + " may connect";
      } else {
        try {
          if (options.allow_peer(peer)) return true;
          verdict = "shm_options::allow_peer does not allow it";
        } catch (const std::exception& e) {
          verdict = std::string("shm_options::allow_peer threw: ") + e.what();
        } catch (...) {
          verdict = "shm_options::allow_peer threw";
        }
      }
      last_refusal = "shm receiver '" + path + "': refused peer " + detail::describe(peer) + ": " + verdict;
      return false;
    }

    // The index of the arena holding all of `bytes`, or -1.
    std::ptrdiff_t arena_of(std::span<const std::byte> bytes) const noexcept {
      const auto at = reinterpret_cast<std::uintptr_t>(bytes.data());
      auto it = arena_by_address.upper_bound(at);
      if (it == arena_by_address.begin()) return -1;
      --it;
      const auto& a = arenas[it->second];
      return local_region{a.map.data(), a.map.size(), 0}.contains(bytes.data(), bytes.size())
                 ? static_cast<std::ptrdiff_t>(it->second)
                 : -1;
    }

    // ---- what detail::serve_notices asks of its listener

    bool serving(const peer_state& p) const noexcept { return !p.gone && !closed; }

    // The ack goes out once the notice is queued here, so the sender's success means this
    // process holds it. With room in the queue that is now, within this handler: a receiver
    // that exits right after taking its last notice has acknowledged it.
    bool notice_arrived(const std::shared_ptr<peer_state>& p, notice n) {
      if (notices.try_send(std::error_code{}, n)) return true;
      notices.async_send(std::error_code{}, n, [w = this->weak_from_this(), p](std::error_code ec) {
        auto s = w.lock();
        if (ec || !s || !s->serving(*p)) return;
        detail::acknowledge_notice(std::weak_ptr<receiver_state>(s), p);
      });
      return false;
    }

    // By value: callers may pass a reference into `peers`, which this erases.
    void sender_left(std::shared_ptr<peer_state> p, std::error_code why) {
      if (p->gone) return;
      p->gone = true;
      std::error_code ignored;
      p->socket.close(ignored);
      if (auto it = peers.find(p->sender); it != peers.end() && it->second == p) peers.erase(it);
      // async_send, not try_send: a full queue must delay the departure, never lose it.
      if (!closed) notices.async_send(why, notice{p->sender, notice_kind::abort, 0}, [](std::error_code) {});
    }
  };

  // What the shm receiver adds to the shared handshake: whom it admits, and, for an
  // admitted sender, the arenas' descriptors and the region table.
  struct accept_hooks {
    std::shared_ptr<receiver_state> receiver;
    std::shared_ptr<accept_state> accept;

    detail::judgement judge(const sender_identity& who) const {
      auto& s = *receiver;
      if (!s.peer_allowed(accept->socket.native_handle())) {
        accept->peer_refused = true;
        return {make_error_code(errc::peer_not_allowed)};
      }
      if (auto refusal = s.admitted.check(who)) return {refusal};
      if (auto it = s.peers.find(who.sender); it != s.peers.end()) {
        const std::error_code taken = make_error_code(errc::invalid_argument);  // sender N is connected
        switch (detail::probe_predecessor(it->second->socket.native_handle())) {
          case detail::predecessor::alive: return {taken};
          case detail::predecessor::leaving: return {taken, true};
          case detail::predecessor::gone: s.sender_left(it->second, make_error_code(errc::peer_disconnected));
        }
      }
      // Another handshake in progress may be admitting the same id.
      if (!s.handshakes->claim(&accept->socket, who.sender)) return {make_error_code(errc::invalid_argument)};
      return {};
    }

    // The header goes out as a message of its own, carrying the memfds: a read that took the
    // verdict and part of the header would drop the descriptors attached to it.
    template <class Handler>
    void operator()(socket_type& socket, const sender_identity&, Handler&& handler) const {
      auto& s = *receiver;
      std::vector<int> fds;
      std::string payload;
      for (const auto& arena : s.arenas) {
        fds.push_back(arena.fd.get());
        detail::put_le<std::uint64_t>(payload, reinterpret_cast<std::uintptr_t>(arena.map.data()));
        detail::put_le<std::uint64_t>(payload, arena.map.size());
      }
      payload += s.table.serialize();
      std::string header(detail::shm_magic);
      detail::put_le<std::uint32_t>(header, static_cast<std::uint32_t>(fds.size()));
      detail::put_le<std::uint64_t>(header, payload.size());
      if (auto e = detail::send_with_fds(socket.native_handle(), std::as_bytes(std::span(header)), fds))
        return std::forward<Handler>(handler)(e, std::size_t{0});
      accept->payload = std::move(payload);
      asio::async_write(socket, asio::buffer(accept->payload), std::forward<Handler>(handler));
    }
  };

  // What detail::accept_peers asks of the transport: one accepted socket's handshake, and
  // the sender installed when it is admitted.
  struct accept_driver {
    std::weak_ptr<receiver_state> receiver;

    std::shared_ptr<receiver_state> lock() const { return receiver.lock(); }
    auto& listener(receiver_state& s) const { return *s.handshakes; }
    acceptor_type& acceptor(receiver_state& s) const { return s.acceptor; }
    std::shared_ptr<accept_state> make_pending(receiver_state& s) const {
      return std::make_shared<accept_state>(s.executor);
    }
    template <class Done>
    void handshake(receiver_state& s, std::shared_ptr<accept_state> a, Done done) const {
      auto r = receiver.lock();
      detail::async_handshake_accepted(std::shared_ptr<socket_type>(a, &a->socket), detail::shm_magic,
                                       s.options.connect_timeout, accept_hooks{std::move(r), a}, std::move(done));
    }
    std::error_code admit(receiver_state& s, const std::shared_ptr<accept_state>& a, std::error_code ec,
                          sender_identity who) const {
      if (s.closed) ec = asio::error::operation_aborted;
      else if (a->peer_refused) ec = {EACCES, std::system_category()};  // std::errc::permission_denied
      if (!ec) {
        auto p = std::make_shared<peer_state>(std::move(a->socket), who.sender);
        s.peers[who.sender] = p;
        s.accepted = true;
        detail::serve_notices(std::weak_ptr<receiver_state>(s.shared_from_this()), std::move(p));
      }
      return detail::shm_system_error(ec);
    }
  };

  struct accept_op {
    std::shared_ptr<receiver_state> receiver;
    std::error_code refused;  // before any handshake: completed through a post

    template <class Self>
    void operator()(Self& self) {
      auto& s = *receiver;
      if (refused) return self.complete(refused, 0u);
      if (s.closed) refused = make_error_code(errc::not_connected);
      else if (s.handshakes->waiting()) refused = make_error_code(errc::invalid_argument);
      if (refused) return asio::post(s.executor, std::move(self));
      self.reset_cancellation_state(asio::enable_total_cancellation());
      const accept_driver driver{receiver};  // before `self` (this op with it) moves into the wait
      s.handshakes->take(std::move(self));
      detail::accept_peers(driver);
    }

    template <class Self>
    void operator()(Self& self, std::error_code ec, std::uint32_t sender) {
      if (receiver->closed && ec != errc::not_connected) ec = asio::error::operation_aborted;
      self.complete(ec, sender);
    }
  };

  // ---- sender side --------------------------------------------------------------------

  enum class link_status { open, closed, failed };

  struct connection_state;

  // A write or a notice, in the connection's queue.
  struct queued_op : detail::erased_op<std::error_code> {
    using detail::erased_op<std::error_code>::erased_op;
    struct piece {
      std::byte* destination;
      const std::byte* source;
      std::size_t size;
    };
    std::shared_ptr<connection_state> owner;  // while copying: keeps the mappings alive
    std::vector<piece> pieces;
    std::atomic<std::size_t> next{0};
    std::atomic<std::size_t> running{0};
    std::atomic<bool> stop{false};
    std::error_code abort_reason;  // io thread only, as the fields below
    std::uint64_t id = 0;
    bool started = false;
    bool is_notice = false;
    detail::notice_frame frame{};

  protected:
    ~queued_op() = default;
  };
  using queued_ptr = detail::op_ptr<queued_op>;

  static void finish(queued_ptr op, std::error_code ec) { op.release()->complete(ec); }

  struct connection_state : std::enable_shared_from_this<connection_state> {
    struct arena {
      std::uint64_t remote = 0;
      std::uint64_t length = 0;
      detail::mapping map;
    };
    connection_state(const Executor& ex, std::shared_ptr<asio::thread_pool> p, shm_options o,
                     socket_type s, sender_identity w)
        : executor(ex), pool(std::move(p)), options(o), control(std::move(s)), who(w) {}

    Executor executor;
    std::shared_ptr<asio::thread_pool> pool;
    shm_options options;
    // Notices and their acks; tagged with the notice op's id, which is gone from the queue
    // if the notice was cancelled.
    detail::notice_link<socket_type, connection_state> control;
    sender_identity who;
    region_table table;
    std::vector<arena> arenas;  // indexed by a region's key
    std::deque<queued_ptr> queue;  // the front runs, the rest wait
    link_status status = link_status::open;
    std::error_code failure;  // why the link failed, for later operations
    std::uint64_t next_id = 0;

    // ---- what detail::notice_link asks of its listener

    void notice_acknowledged(std::uint64_t id) {
      if (!queue.empty() && queue.front()->id == id) finish_front(this->shared_from_this(), {});
    }

    // The receiver went away (or acknowledged something else): the link fails.
    void control_ended(std::error_code why) { shut(this->shared_from_this(), link_status::failed, why); }

    // Validates the whole batch before any byte moves, then cuts it into pieces.
    std::error_code translate(std::span<const write_request> batch, queued_op& op) const {
      const std::size_t chunk = options.chunk_bytes ? options.chunk_bytes : SIZE_MAX;
      for (const auto& w : batch) {
        const std::uint64_t n = w.source.size();
        // A sender may coalesce writes over neighbouring regions (of one key, so one arena).
        if (!table.covers(w.remote_address, n)) return make_error_code(errc::region_not_exposed);
        const remote_region* r = table.find(w.remote_address, n ? 1 : 0);
        if (!r) return make_error_code(errc::region_not_exposed);
        // Connect checked that every region lies inside the arena its key names; the whole
        // write must too.
        const arena& a = arenas[r->key];
        const std::uint64_t at = w.remote_address - a.remote;
        if (at > a.length || n > a.length - at) return make_error_code(errc::region_not_exposed);
        std::byte* dst = a.map.data() + (w.remote_address - a.remote);
        for (std::uint64_t off = 0; off < n; off += chunk)
          op.pieces.push_back({dst + off, w.source.data() + off,
                               static_cast<std::size_t>(std::min<std::uint64_t>(chunk, n - off))});
      }
      return {};
    }
  };

  static std::error_code unusable(const std::shared_ptr<connection_state>& s) {
    if (!s || s->status == link_status::closed) return make_error_code(errc::not_connected);
    return s->status == link_status::failed ? s->failure : std::error_code{};
  }

  template <class Slot>
  static void enqueue(const std::shared_ptr<connection_state>& s, queued_ptr op, Slot slot) {
    op->id = ++s->next_id;
    if (slot.is_connected())
      // Posted, not run here: the op must not be destroyed inside its own slot.
      slot.assign([w = std::weak_ptr<connection_state>(s), ex = s->executor, id = op->id](asio::cancellation_type) {
        asio::post(ex, [w, id] {
          if (auto s = w.lock()) cancel_queued(s, id);
        });
      });
    s->queue.push_back(std::move(op));
    start_front(s);
  }

  static void copy_task(queued_op* op) {
    while (!op->stop.load(std::memory_order_relaxed)) {
      const std::size_t i = op->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= op->pieces.size()) break;
      const auto& p = op->pieces[i];
      std::memcpy(p.destination, p.source, p.size);
    }
    // acq_rel: the last copier sees every other copier's bytes in the shared pages before it
    // hands the op back (the post then orders them before the io thread reports or notifies).
    if (op->running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      auto owner = std::move(op->owner);
      auto ex = owner->executor;
      // From here on `op` belongs to the io thread again.
      asio::post(ex, [owner = std::move(owner)]() mutable { copies_done(std::move(owner)); });
    }
  }

  static void start_front(const std::shared_ptr<connection_state>& s) {
    if (s->queue.empty() || s->queue.front()->started) return;
    auto& op = *s->queue.front();
    op.started = true;
    if (op.is_notice) return s->control.send(op.frame, op.id);
    if (op.pieces.empty()) {
      // Nothing to copy: still never complete inline.
      asio::post(s->executor, [owner = s]() mutable { copies_done(std::move(owner)); });
      return;
    }
    const std::size_t tasks = std::min(std::max<std::size_t>(s->options.copy_threads, 1), op.pieces.size());
    op.owner = s;
    op.running.store(tasks, std::memory_order_relaxed);
    for (std::size_t i = 0; i < tasks; ++i) asio::post(*s->pool, [p = &op] { copy_task(p); });
  }

  static void finish_front(const std::shared_ptr<connection_state>& s, std::error_code ec) {
    auto op = std::move(s->queue.front());
    s->queue.pop_front();
    finish(std::move(op), ec);
    start_front(s);
  }

  static void copies_done(std::shared_ptr<connection_state> s) {
    finish_front(s, s->queue.front()->abort_reason);
  }

  // Close or failure: waiting ops and a notice awaiting its ack complete now; a copying
  // write after its memcpy.
  static void shut(const std::shared_ptr<connection_state>& s, link_status why, std::error_code failure = {}) {
    const auto reason = why == link_status::closed ? std::error_code(asio::error::operation_aborted) : failure;
    if (s->status == link_status::open) {
      s->status = why;
      s->failure = failure;
    } else if (why == link_status::closed) {
      s->status = why;
    }
    s->control.close();
    std::vector<queued_ptr> ended;  // newest first
    while (!s->queue.empty() && !s->queue.back()->started) {
      ended.push_back(std::move(s->queue.back()));
      s->queue.pop_back();
    }
    if (!s->queue.empty()) {
      auto& front = *s->queue.front();
      if (front.is_notice) {
        ended.push_back(std::move(s->queue.front()));
        s->queue.pop_front();
      } else if (!front.abort_reason) {
        front.abort_reason = reason;
        front.stop.store(true, std::memory_order_relaxed);
      }
    }
    for (auto it = ended.rbegin(); it != ended.rend(); ++it) finish(std::move(*it), reason);
  }

  static void cancel_queued(const std::shared_ptr<connection_state>& s, std::uint64_t id) {
    for (auto it = s->queue.begin(); it != s->queue.end(); ++it)
      if ((*it)->id == id) {
        if ((*it)->started && !(*it)->is_notice) return;  // mid-copy: it finishes
        // A notice already sent stays sent; its ack, when it comes, finds no op.
        const bool front = it == s->queue.begin();
        auto op = std::move(*it);
        s->queue.erase(it);
        finish(std::move(op), asio::error::operation_aborted);
        if (front) start_front(s);
        return;
      }
  }

public:
  using executor_type = Executor;

  /// Senders copy from host memory, pinned or not.
  static constexpr memory_kinds source_kinds{memory_kind::host, memory_kind::host_pinned};
  /// Receivers share memfd arenas, which are host memory.
  static constexpr memory_kinds destination_kinds{memory_kind::host};

  /// The sender side: completions run on `ex`; the copies on options.copy_threads worker
  /// threads started here. Throws what std::thread throws when they cannot start.
  explicit basic_shm_transport(const executor_type& ex, shm_options options = {})
      : executor_(ex), options_(options),
        pool_(std::make_shared<asio::thread_pool>(std::max<std::size_t>(options.copy_threads, 1))) {}

  /// Where async_connect completes; connections take it over.
  executor_type get_executor() const noexcept { return executor_; }

  /// The sender's memory needs no registration: copies read it in place.
  using registration = unregistered_memory;

  /// Records `bytes` as staging memory at `where`. Throws shardline::error
  /// (errc::unsupported_memory) for a kind outside source_kinds (device memory).
  registration register_memory(std::span<std::byte> bytes, memory_location where = {}) {
    require_kind(source_kinds, where, "the shm transport", "staging memory");
    return registration{bytes, where};
  }

  /// The rollout side: owns the arenas (memfd + MAP_SHARED) and listens on a Unix socket for
  /// its senders until close(). Move-only; closes on destruction.
  class receiver {
  public:
    /// Listens at `socket_path`, a socket file created 0600 whatever the umask (only its
    /// owner, and root, can connect). A socket file already there is replaced only when
    /// nobody listens on it (a probe connects: one a live receiver's async_accept sees as a
    /// peer that left). Throws shardline::error naming the path and the cause:
    /// std::errc::address_in_use when a live receiver listens there (it keeps working) or
    /// the path is not a socket file; the system error of socket, fchmod, bind or listen.
    receiver(const executor_type& ex, std::string socket_path, shm_options options = {})
        : state_(std::make_shared<receiver_state>(ex, std::move(socket_path), options)) {
      auto& s = *state_;
      if (auto ec = path_error(s.path))
        throw error(ec, "shm receiver: socket path '" + s.path + "' must be 1 to " +
                            std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) + " bytes");
      replace_stale_socket(s.path);
      std::error_code ec;
      auto check = [&](const char* what) {
        ec = detail::shm_system_error(ec);
        if (ec) throw error(ec, "shm receiver: cannot " + std::string(what) + " socket '" + s.path + "': " + ec.message());
      };
      s.acceptor.open(asio::local::stream_protocol(), ec);
      check("open a");
      // Linux creates the file with the socket's own mode less the umask: 0600 from here,
      // atomically and without touching the process-wide umask other threads rely on (a
      // chmod after bind would leave a window; a private directory would change the path).
      if (::fchmod(s.acceptor.native_handle(), S_IRUSR | S_IWUSR) != 0) ec = detail::last_system_error();
      check("restrict to its owner the");
      s.acceptor.bind(asio::local::stream_protocol::endpoint(s.path), ec);
      check("bind");
      struct stat st {};
      if (::lstat(s.path.c_str(), &st) == 0) {
        s.socket_device = st.st_dev;
        s.socket_inode = st.st_ino;
        s.path_bound = true;
      }
      s.acceptor.listen(asio::socket_base::max_listen_connections, ec);
      check("listen on");
    }
    /// Moves take over the socket, the arenas and the senders; the moved-from receiver is
    /// empty (only destruction and assignment are valid on it).
    receiver(receiver&&) noexcept = default;
    receiver& operator=(receiver&& o) noexcept {
      if (this != &o) {
        close();
        state_ = std::move(o.state_);
      }
      return *this;
    }
    /// close(); the arenas are unmapped here (senders keep their own mappings).
    ~receiver() { close(); }

    /// Where its completions run (the rollout's io_context).
    executor_type get_executor() const noexcept { return state_->executor; }

    /// A zeroed arena of `bytes` the senders may write into: a memfd mapped MAP_SHARED here
    /// and, once connected, in every sender, sealed against shrinking and growing
    /// (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) so its pages stay valid in every sender
    /// as long as any maps them. Throws shardline::error: errc::invalid_argument
    /// for 0 bytes, past 253 arenas, or once a sender has connected (senders receive the
    /// arenas when they connect); the system error of memfd_create, ftruncate, fcntl
    /// (F_ADD_SEALS) or mmap.
    std::span<std::byte> allocate(std::size_t bytes) {
      auto& s = *state_;
      const auto where = "shm receiver '" + s.path + "': arena of " + std::to_string(bytes) + " bytes: ";
      if (bytes == 0) throw error(make_error_code(errc::invalid_argument), where + "an arena cannot be empty");
      if (s.arenas.size() >= detail::max_fds_per_message)
        throw error(make_error_code(errc::invalid_argument), where + "more than 253 arenas");
      if (s.accepted)
        throw error(make_error_code(errc::invalid_argument), where + "allocated after a sender connected");
      detail::unique_fd fd(::memfd_create("shardline-arena", MFD_CLOEXEC | MFD_ALLOW_SEALING));
      if (!fd.valid()) {
        auto ec = detail::last_system_error();
        throw error(ec, where + "memfd_create failed: " + ec.message());
      }
      if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
        auto ec = detail::last_system_error();
        throw error(ec, where + "ftruncate failed: " + ec.message());
      }
      // Sealed before any sender sees it: senders refuse an arena whose size could change.
      if (::fcntl(fd.get(), F_ADD_SEALS, detail::arena_seals) != 0) {
        auto ec = detail::last_system_error();
        throw error(ec, where + "sealing it against resizing failed: " + ec.message());
      }
      std::error_code ec;
      auto map = detail::mapping::map_shared(fd.get(), bytes, 0, ec);
      if (ec) throw error(ec, where + "mmap failed: " + ec.message());
      auto span = map.bytes();
      s.arena_by_address.emplace(reinterpret_cast<std::uintptr_t>(span.data()), s.arenas.size());
      s.arenas.push_back({std::move(fd), std::move(map)});
      return span;
    }

    /// Names `e.bytes`, with its location and layout, in the region table the senders
    /// receive. Only a range inside one of this receiver's arenas can be shared. Throws
    /// shardline::error naming the region: errc::unsupported_memory for a location outside
    /// destination_kinds or a range outside every arena; errc::invalid_argument for a name
    /// given twice, an overlap with an exposed region, or once a sender has connected.
    void expose(exposure e) {
      auto& s = *state_;
      static constexpr detail::exposer who{"shm receiver", "the shm transport", destination_kinds};
      // A region's key is the index of the arena holding it.
      detail::expose_region(s.table, std::move(e), who, [&](const exposure& x) {
        const auto arena = s.arena_of(x.bytes);
        if (arena < 0)
          throw error(make_error_code(errc::unsupported_memory),
                      who.region(x.name) +
                          " is not inside an arena this receiver allocated: the shm transport can "
                          "share only its own memfd arenas (allocate() them, or use "
                          "weights_receiver's layout mode)");
        if (s.accepted)
          throw error(make_error_code(errc::invalid_argument), who.region(x.name) + " exposed after a sender connected");
        return static_cast<std::uint32_t>(arena);
      });
    }

    /// expose({name, bytes}): a host byte region without a layout.
    void expose(std::string name, std::span<std::byte> bytes) { expose({std::move(name), bytes, {}, {}}); }

    /// Whom later handshakes admit; senders already connected stay.
    void admit(admission a) noexcept { state_->admitted = a; }

    /// Why the last peer refused for its credentials was refused, naming its pid, uid and
    /// gid (async_accept completed with std::errc::permission_denied); empty before any.
    const std::string& last_refusal() const noexcept { return state_->last_refusal; }

    /// Addresses are this process's addresses; a region's key is its arena's index.
    const region_table& regions() const noexcept { return state_->table; }

    /// Accepts one sender: completion void(std::error_code, std::uint32_t sender). Call it
    /// again for each further sender. From the first call until close() the receiver accepts
    /// peers as they come and runs their handshakes side by side (at most
    /// options.max_pending_handshakes, counting ended ones not yet taken; further peers wait
    /// in the socket's backlog), so a silent peer holds only its own handshake; each call
    /// takes the result of the next handshake to end, in the order they end.
    ///
    /// The handshake reads the sender's hello, checks the peer's credentials (see
    /// shm_options::allow_peer), then the hello against admit()'s admission and the senders
    /// connected now, answers with a verdict and, when admitted, hands over the arenas and
    /// the region table. `sender` is the id the peer claimed (0 when its hello did not
    /// parse). Errors, each ending this peer's connection only (the receiver goes on
    /// listening, call again): std::errc::permission_denied (a process that may not connect:
    /// last_refusal() names it; it read the verdict errc::peer_not_allowed and nothing else),
    /// errc::protocol_error (not a shardline hello),
    /// errc::protocol_version_mismatch (another control protocol version), errc::unknown_sender
    /// or errc::plan_mismatch (refused by admission), errc::invalid_argument (sender `sender`
    /// is already connected; a predecessor that hung up counts as gone, once the notices it
    /// sent before are read when there are any), std::errc::timed_out (the peer took longer
    /// than options.connect_timeout), errc::peer_disconnected (the peer left mid-handshake).
    /// Errors of the receiver: errc::not_connected after close(), operation_aborted when
    /// close() ends a pending accept, errc::invalid_argument when another async_accept is
    /// pending.
    ///
    /// Cancellation (any type): completes with operation_aborted unless it completed first;
    /// handshakes in progress go on, their results kept for the next call. Never completes
    /// inline.
    template <class Token>
    auto async_accept(Token&& token) {
      return asio::async_compose<Token, void(std::error_code, std::uint32_t)>(accept_op{state_, {}}, token,
                                                                             state_->executor);
    }

    /// Completion void(std::error_code, notice): each notice of each sender, in that
    /// sender's order, every one after the writes its sender completed before sending it.
    /// When a sender leaves: errc::peer_disconnected with notice {sender, abort, 0}; when it
    /// sent a malformed notice: errc::protocol_error with the same notice, and its connection
    /// is dropped. Either way its id is free again and the other senders go on. After
    /// close(), a pending wait completes with asio::experimental::error::channel_cancelled
    /// and later ones with errc::not_connected. Cancellable (any type) through the handler's
    /// cancellation slot; a notice is never lost to a cancelled wait.
    template <class Token>
    auto async_wait_notification(Token&& token) {
      return asio::async_initiate<Token, void(std::error_code, notice)>(
          [s = state_](auto handler) {
            if (s->closed)
              return detail::post_completion(s->executor, std::move(handler),
                                             make_error_code(errc::not_connected), notice{});
            s->notices.async_receive(std::move(handler));
          },
          token);
    }

    /// Stops listening, ends a pending accept, closes every sender's socket (their pending
    /// and later operations fail with errc::peer_disconnected) and removes the socket file.
    /// The arenas stay mapped here until destruction. Never throws.
    void close() noexcept {
      if (!state_ || state_->closed) return;
      auto& s = *state_;
      s.closed = true;
      std::error_code ignored;
      s.acceptor.close(ignored);
      // Peers in mid-handshake: their pending steps fail, a pending accept with operation_aborted.
      s.handshakes->close();
      for (auto& [id, p] : s.peers) {
        p->gone = true;
        p->socket.close(ignored);
      }
      s.peers.clear();
      s.unlink_path();
      s.notices.cancel();
    }

  private:
    // A socket file whose receiver is gone is removed; a live receiver's is left alone and
    // refused. Anything else at the path (not a socket) is left to bind to refuse.
    static void replace_stale_socket(const std::string& path) {
      struct stat probed {};
      if (::lstat(path.c_str(), &probed) != 0 || !S_ISSOCK(probed.st_mode)) return;
      std::error_code unknown;
      switch (detail::probe_socket_owner(path, unknown)) {
        case detail::socket_owner::none: return;
        case detail::socket_owner::live:
          throw error(make_error_code(std::errc::address_in_use),
                      "shm receiver: socket '" + path + "' " +
                          (unknown ? "may belong to a live receiver (probing it failed: " + unknown.message() + ")"
                                   : "belongs to a live receiver") +
                          "; close that one or choose another path");
        case detail::socket_owner::stale: {
          // Only the file probed: one bound there since belongs to someone else.
          struct stat now {};
          if (::lstat(path.c_str(), &now) == 0 && now.st_dev == probed.st_dev && now.st_ino == probed.st_ino)
            ::unlink(path.c_str());
        }
      }
    }

    std::shared_ptr<receiver_state> state_;
  };

  /// The trainer side of one link. Move-only; closes on destruction.
  class connection {
  public:
    using executor_type = Executor;

    /// A closed connection: every operation fails with errc::not_connected.
    connection() requires std::default_initializable<Executor> = default;
    /// Moves keep pending operations running; assigning over an open connection closes it.
    connection(connection&&) noexcept = default;
    connection& operator=(connection&& o) noexcept {
      if (this != &o) {
        close();
        executor_ = std::move(o.executor_);
        state_ = std::move(o.state_);
      }
      return *this;
    }
    ~connection() { close(); }

    /// Where its operations complete (the transport's executor).
    executor_type get_executor() const noexcept { return executor_; }

    /// The receiver's regions; addresses are the receiver's addresses.
    const region_table& remote_regions() const noexcept {
      static const region_table none;
      return state_ ? state_->table : none;
    }

    /// Who this sender said it is when it connected.
    sender_identity identity() const noexcept { return state_ ? state_->who : sender_identity{}; }

    /// False after close() or once the link failed.
    bool is_open() const noexcept { return state_ && state_->status == link_status::open; }

    /// Completion void(std::error_code), once every request landed (copied by the worker
    /// threads, split into chunk_bytes pieces). The whole batch is validated first: a request
    /// outside every exposed region fails it with errc::region_not_exposed before any byte
    /// moves, and the connection stays usable. Writes and notices run one after another, in
    /// initiation order. Per-operation cancellation (any type): a batch whose copies have not
    /// started completes with operation_aborted and the connection stays usable; one already
    /// copying finishes. Only the link failing ends it: the receiver gone,
    /// errc::peer_disconnected (a batch cut short may have landed in part); close(),
    /// operation_aborted; later operations errc::not_connected after close(), the failure's
    /// code after a failure.
    template <class Token>
    auto async_write(std::span<const write_request> batch, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [ex = executor_, s = state_](auto handler, std::span<const write_request> batch) {
            if (auto ec = unusable(s)) return detail::post_completion(ex, std::move(handler), ec);
            auto slot = asio::get_associated_cancellation_slot(handler);
            auto op = detail::make_op<queued_op>(std::move(handler), ex);
            if (auto ec = s->translate(batch, *op)) return finish(std::move(op), ec);
            enqueue(s, std::move(op), slot);
          },
          token, batch);
    }

    /// Delivers notice {identity().sender, kind, version} to the receiver after every
    /// earlier write and notice of this connection completed. Completion void(std::error_code)
    /// once the receiver acknowledged it, that is once the receiving process has queued it
    /// for async_wait_notification (a full queue there delays the acknowledgement). The
    /// receiver gone before acknowledging: errc::peer_disconnected; an acknowledgement that
    /// is not this notice's: errc::protocol_error; close(): operation_aborted; later:
    /// errc::not_connected, or the failure's code. Per-operation cancellation (any type):
    /// completes with operation_aborted, the connection stays usable; a notice already sent
    /// may still reach the receiver (its acknowledgement is then ignored).
    template <class Token>
    auto async_notify(notice_kind kind, std::uint32_t version, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [ex = executor_, s = state_](auto handler, notice_kind kind, std::uint32_t version) {
            if (auto ec = unusable(s)) return detail::post_completion(ex, std::move(handler), ec);
            auto slot = asio::get_associated_cancellation_slot(handler);
            auto op = detail::make_op<queued_op>(std::move(handler), ex);
            op->is_notice = true;
            op->frame = detail::encode_notice(kind, version);
            enqueue(s, std::move(op), slot);
          },
          token, kind, version);
    }

    /// Waiting operations and a notice awaiting its acknowledgement complete with
    /// operation_aborted now, a copying write after its memcpy; the receiver sees this sender
    /// leave. The mappings go when the last operation is done. Never throws.
    void close() noexcept {
      if (state_ && state_->status != link_status::closed) shut(state_, link_status::closed);
    }

  private:
    friend class basic_shm_transport;
    connection(const Executor& ex, std::shared_ptr<connection_state> s)
        : executor_(ex), state_(std::move(s)) {}

    Executor executor_;
    std::shared_ptr<connection_state> state_;
  };

  /// Connects as sender `who` to the receiver listening at `socket_path`: says hello, gets
  /// the verdict and, when admitted, the receiver's arenas and region table, and maps them,
  /// faulting in the pages of the exposed regions now (MADV_POPULATE_WRITE: the page-table
  /// cost is paid here rather than in the first writes, and never for more than the regions).
  /// Completion void(std::error_code, connection). Errors: the receiver's refusal
  /// (errc::peer_not_allowed for a process its credentials refuse; errc::unknown_sender, errc::plan_mismatch,
  /// errc::invalid_argument when a sender with this id is connected,
  /// errc::protocol_version_mismatch); the system error of connect (e.g.
  /// no_such_file_or_directory, connection_refused, permission_denied for a socket file
  /// this process may not open); std::errc::timed_out after options.connect_timeout;
  /// errc::peer_disconnected when the receiver went away mid-handshake;
  /// errc::protocol_error for a malformed handshake or one past options.max_handshake_bytes;
  /// errc::unsupported_memory for an arena not sealed against resizing (F_SEAL_SHRINK,
  /// F_SEAL_GROW, F_SEAL_SEAL) or whose pages cannot be provided; errc::invalid_argument
  /// for a path too long for a Unix socket. last_connect_failure() says which. Cancellable
  /// (any type) through the handler's cancellation slot: operation_aborted.
  template <class Token>
  auto async_connect(std::string socket_path, sender_identity who, Token&& token) {
    return asio::async_compose<Token, void(std::error_code, connection)>(
        connect_op{std::make_shared<connect_state>(executor_, pool_, options_, std::move(socket_path), who,
                                                   last_failure_),
                   {}},
        token, executor_);
  }

  /// Why the last async_connect that failed failed, naming the socket path and, when the
  /// receiver handed over something this sender refuses, what (e.g. "arena 0 (4096 bytes)
  /// is not sealed against resizing"); empty before any failure.
  const std::string& last_connect_failure() const noexcept { return *last_failure_; }

  /// async_connect(socket_path, sender_identity{}, token): sender 0, no plan.
  template <class Token>
  auto async_connect(std::string socket_path, Token&& token) {
    return async_connect(std::move(socket_path), sender_identity{}, std::forward<Token>(token));
  }

private:
  // A sender's handshake: its socket and what the receiver hands over, shared with the
  // socket operations.
  struct connect_state {
    connect_state(const Executor& ex, std::shared_ptr<asio::thread_pool> p, shm_options o, std::string path,
                  sender_identity w, std::shared_ptr<std::string> f)
        : executor(ex), pool(std::move(p)), options(o), path(std::move(path)), who(w), socket(ex),
          last_failure(std::move(f)) {}
    Executor executor;
    std::shared_ptr<asio::thread_pool> pool;
    shm_options options;
    std::string path;
    sender_identity who;
    socket_type socket;
    std::array<std::byte, detail::shm_header_bytes> header{};
    std::size_t header_got = 0;
    std::vector<detail::unique_fd> fds;
    std::vector<std::byte> payload;
    std::uint64_t payload_bytes = 0;  // announced by the header
    std::vector<typename connection_state::arena> arenas;
    region_table table;
    std::string why;  // what was refused, for last_connect_failure()
    std::shared_ptr<std::string> last_failure;
  };

  // What the shm sender adds to the shared handshake once admitted: the header with the
  // arenas' descriptors (read with recvmsg when readable), then the payload, then the
  // mappings.
  struct receive_arenas {
    std::shared_ptr<connect_state> c;
    enum class step { wait, header, payload } at = step::wait;

    template <class Self>
    void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
      if (ec) return self.complete(ec);
      switch (at) {
        case step::wait:
          at = step::header;
          return c->socket.async_wait(asio::socket_base::wait_read, std::move(self));
        case step::header: {
          bool truncated = false;
          std::error_code e;
          const auto want = std::span(c->header).subspan(c->header_got);
          const std::size_t n = detail::receive_with_fds(c->socket.native_handle(), want, c->fds, truncated, e);
          if (e && e != std::errc::resource_unavailable_try_again && e != std::errc::operation_would_block)
            return self.complete(e);
          if (!e && n == 0) return self.complete(make_error_code(errc::peer_disconnected));
          if (truncated) return self.complete(make_error_code(errc::protocol_error));
          c->header_got += n;
          if (c->header_got < c->header.size()) {
            at = step::header;
            return c->socket.async_wait(asio::socket_base::wait_read, std::move(self));
          }
          const auto count = detail::get_le<std::uint32_t>(c->header.data() + 4);
          const auto bytes = detail::get_le<std::uint64_t>(c->header.data() + 8);
          if (std::memcmp(c->header.data(), detail::shm_magic.data(), 4) != 0 || count != c->fds.size() ||
              bytes < 16 * std::uint64_t(count))
            return self.complete(make_error_code(errc::protocol_error));
          if (bytes > c->options.max_handshake_bytes) {
            c->why = "the receiver announced " + std::to_string(bytes) + " bytes of arenas and region table, past "
                     "shm_options::max_handshake_bytes (" + std::to_string(c->options.max_handshake_bytes) + ")";
            return self.complete(make_error_code(errc::protocol_error));
          }
          c->payload_bytes = bytes;
          at = step::payload;
          return read_piece_of(*c, self);
        }
        case step::payload:
          if (c->payload.size() < c->payload_bytes) return read_piece_of(*c, self);
          return self.complete(map_arenas(*c));
      }
    }
  };

  // Grows the payload by the next piece and reads into it.
  template <class Self>
  static void read_piece_of(connect_state& c, Self& self) {
    const std::size_t got = c.payload.size();
    const std::size_t piece =
        static_cast<std::size_t>(std::min<std::uint64_t>(detail::shm_payload_piece, c.payload_bytes - got));
    c.payload.resize(got + piece);
    asio::async_read(c.socket, asio::buffer(c.payload.data() + got, piece), std::move(self));
  }

  struct connect_exchange {
    std::shared_ptr<connect_state> c;
    template <class Handler>
    void operator()(socket_type&, Handler&& handler) const {
      asio::async_compose<std::decay_t<Handler>, void(std::error_code)>(receive_arenas{c}, handler, c->executor);
    }
  };

  // A receiver decides what it hands over: every arena must be a file whose size can never
  // change again (a shrunk one would SIGBUS our copies), at least as long as it says, and
  // only the pages of the regions it exposes are faulted in here.
  static std::error_code map_arenas(connect_state& c) {
    const std::byte* p = c.payload.data();
    for (auto& fd : c.fds) {
      typename connection_state::arena a;
      a.remote = detail::get_le<std::uint64_t>(p);
      a.length = detail::get_le<std::uint64_t>(p + 8);
      p += 16;
      const auto arena = "arena " + std::to_string(c.arenas.size()) + " (" + std::to_string(a.length) + " bytes)";
      const int seals = ::fcntl(fd.get(), F_GET_SEALS);
      if (seals < 0 || (seals & detail::arena_seals) != detail::arena_seals) {
        const auto has = seals < 0 ? "none (not a memfd: " + detail::last_system_error().message() + ")"
                                   : detail::seal_names(seals);
        c.why = arena + " is not sealed against resizing: it has seals " + has + ", it needs " +
                detail::seal_names(detail::arena_seals);
        return make_error_code(errc::unsupported_memory);
      }
      // Sealed: the size read now is the size for good.
      struct stat info {};
      if (::fstat(fd.get(), &info) != 0 || !S_ISREG(info.st_mode) || a.length == 0 ||
          static_cast<std::uint64_t>(info.st_size) < a.length) {
        c.why = arena + " is longer than its file (" + std::to_string(info.st_size) + " bytes) or empty";
        return make_error_code(errc::protocol_error);
      }
      std::error_code e;
      a.map = detail::mapping::map_shared(fd.get(), static_cast<std::size_t>(a.length), 0, e);
      if (e) {
        c.why = arena + " could not be mapped: " + e.message();
        return e;
      }
      c.arenas.push_back(std::move(a));
    }
    std::error_code e;
    c.table = region_table::parse(
        std::string_view(reinterpret_cast<const char*>(p),
                         static_cast<std::size_t>(c.payload.data() + c.payload.size() - p)),
        e);
    if (e) return e;
    // Writes translate through the region's arena: a region outside it would be a write
    // outside the mapping.
    for (const auto& r : c.table.regions()) {
      if (r.key >= c.arenas.size()) return make_error_code(errc::protocol_error);
      const auto& a = c.arenas[r.key];
      if (r.address < a.remote || r.length > a.length || r.address - a.remote > a.length - r.length)
        return make_error_code(errc::protocol_error);
    }
    // The page-table cost of the regions is paid here rather than in the first writes. The
    // regions never overlap, so this faults in at most what the sender may write, whatever
    // length the receiver claimed for its arenas. Neighbouring regions (a layout's
    // parameters) go in one call.
    struct run {
      std::uint32_t arena = 0;
      std::size_t begin = 0, end = 0;
      const remote_region* first = nullptr;
    } pending;
    auto flush = [&]() -> std::error_code {
      if (!pending.first) return {};
      auto e = detail::prefault(c.arenas[pending.arena].map, pending.begin, pending.end - pending.begin);
      if (!e) return {};
      c.why = "the regions from '" + pending.first->name + "' on, in arena " + std::to_string(pending.arena) +
              ", cannot be faulted in: " + e.message();
      return e == std::errc::bad_address ? make_error_code(errc::unsupported_memory) : e;
    };
    for (const auto& r : c.table.regions()) {
      const auto begin = static_cast<std::size_t>(r.address - c.arenas[r.key].remote);
      const auto end = begin + static_cast<std::size_t>(r.length);
      if (pending.first && r.key == pending.arena && begin >= pending.end && begin - pending.end < 4096) {
        pending.end = end;
        continue;
      }
      if (auto e = flush()) return e;
      pending = {r.key, begin, end, &r};
    }
    return flush();
  }

  struct connect_op {
    std::shared_ptr<connect_state> c;
    std::error_code refused;  // before any handshake: completed through a post

    template <class Self>
    void operator()(Self& self) {
      if (refused) return self.complete(refused, connection(c->executor, nullptr));
      if ((refused = path_error(c->path))) return asio::post(c->executor, std::move(self));
      self.reset_cancellation_state(asio::enable_total_cancellation());
      detail::async_handshake_as_sender(std::shared_ptr<socket_type>(c, &c->socket),
                                        asio::local::stream_protocol::endpoint(c->path), detail::shm_magic, c->who,
                                        c->options.connect_timeout, connect_exchange{c}, std::move(self));
    }

    template <class Self>
    void operator()(Self& self, std::error_code ec) {
      if (ec) {
        ec = detail::shm_system_error(ec);
        *c->last_failure = error(ec, "shm sender: connecting to '" + c->path + "'" +
                                         (c->why.empty() ? std::string() : ": " + c->why))
                               .what();
        return self.complete(ec, connection(c->executor, nullptr));
      }
      auto s = std::make_shared<connection_state>(c->executor, c->pool, c->options, std::move(c->socket), c->who);
      s->arenas = std::move(c->arenas);
      s->table = std::move(c->table);
      s->control.watch(s);
      self.complete(std::error_code{}, connection(c->executor, std::move(s)));
    }
  };

  executor_type executor_;
  shm_options options_;
  std::shared_ptr<asio::thread_pool> pool_;
  std::shared_ptr<std::string> last_failure_ = std::make_shared<std::string>();
};

using shm_transport = basic_shm_transport<>;

static_assert(transport<shm_transport>);

}  // namespace shardline
