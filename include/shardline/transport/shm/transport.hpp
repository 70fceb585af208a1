// shardline/transport/shm/transport.hpp: processes of one host. A receiver (rollout) maps its arenas
// from memfds and hands them, over a Unix socket, to every sender (trainer) it admits; each
// sender maps them too and copies into them on worker threads, never on the io_context.
#pragma once

#include <shardline/detail/codec.hpp>
#include <shardline/detail/completion.hpp>
#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/shm/detail/handles.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/basic_socket_acceptor.hpp>
#include <asio/basic_stream_socket.hpp>
#include <asio/basic_waitable_timer.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/recycling_allocator.hpp>
#include <asio/thread_pool.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace shardline {

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
inline constexpr std::uint64_t shm_max_payload = std::uint64_t(1) << 30;

// Asio reports syscall failures in its own "asio.system" category, which does not compare
// equal to std::errc values; ours use std::system_category. operation_aborted stays Asio's,
// as every Asio user compares with asio::error::operation_aborted.
inline std::error_code shm_system_error(std::error_code ec) noexcept {
  if (ec && ec.category() == asio::error::get_system_category() && ec != asio::error::operation_aborted)
    return {ec.value(), std::system_category()};
  return ec;
}

// During a handshake every way of seeing the peer go means the same thing to the caller.
inline std::error_code shm_handshake_error(std::error_code ec) noexcept {
  ec = shm_system_error(ec);
  if (ec == asio::error::eof || ec == std::errc::connection_reset || ec == std::errc::broken_pipe)
    return make_error_code(errc::peer_disconnected);
  return ec;
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
  using timer_type = asio::basic_waitable_timer<std::chrono::steady_clock,
                                                asio::wait_traits<std::chrono::steady_clock>, Executor>;
  using notice_channel = asio::experimental::channel<Executor, void(std::error_code, notice)>;

  static std::error_code path_error(const std::string& path) {
    if (path.empty() || path.size() >= sizeof(sockaddr_un{}.sun_path))
      return make_error_code(errc::invalid_argument);
    return {};
  }

  // ---- operations -------------------------------------------------------------------

  // What the untemplated code sees of an operation. complete() consumes it.
  template <class... Args>
  struct completion_base {
    virtual void complete(Args... args) = 0;
    virtual void destroy() noexcept = 0;  // drops the handler uncalled (its owner is going away)

  protected:
    ~completion_base() = default;
  };

  template <class Base>
  struct op_deleter {
    void operator()(Base* op) const noexcept { op->destroy(); }
  };
  template <class Base>
  using op_ptr = std::unique_ptr<Base, op_deleter<Base>>;

  // An operation's state and its handler in one block, allocated with the handler's
  // associated allocator (Asio's recycling one by default) and freed before the upcall, as
  // Asio's own handlers are (wait_handler::do_complete): the next operation the handler
  // starts can reuse the memory. Created and destroyed on the io thread only.
  template <class Base, class Handler, class... Args>
  class handler_op final : public Base {
    using handler_executor = asio::associated_executor_t<Handler, Executor>;
    using allocator_type = typename std::allocator_traits<asio::associated_allocator_t<
        Handler, asio::recycling_allocator<void>>>::template rebind_alloc<handler_op>;
    using allocator_traits = std::allocator_traits<allocator_type>;

  public:
    static op_ptr<Base> create(Handler&& h, const Executor& io) {
      allocator_type alloc(asio::get_associated_allocator(h, asio::recycling_allocator<void>()));
      handler_op* p = allocator_traits::allocate(alloc, 1);
      try {
        return op_ptr<Base>(new (p) handler_op(std::move(h), io, alloc));
      } catch (...) {
        allocator_traits::deallocate(alloc, p, 1);
        throw;
      }
    }

    void complete(Args... args) override {
      auto slot = asio::get_associated_cancellation_slot(handler_);
      if (slot.is_connected()) slot.clear();
      Handler handler(std::move(handler_));
      // The guards outlive the op until post() holds the work itself.
      auto handler_work = std::move(handler_work_);
      auto io_work = std::move(io_work_);
      const Executor io = io_executor_;
      destroy();
      detail::post_completion(io, std::move(handler), std::move(args)...);
    }

    void destroy() noexcept override {
      allocator_type a(alloc_);
      this->~handler_op();
      allocator_traits::deallocate(a, this, 1);
    }

  private:
    handler_op(Handler&& h, const Executor& io, const allocator_type& a)
        : alloc_(a), io_executor_(io),
          handler_work_(asio::make_work_guard(asio::get_associated_executor(h, io))),
          io_work_(asio::make_work_guard(io)), handler_(std::move(h)) {}

    allocator_type alloc_;
    Executor io_executor_;
    decltype(asio::make_work_guard(std::declval<handler_executor&>())) handler_work_;
    decltype(asio::make_work_guard(std::declval<Executor&>())) io_work_;
    Handler handler_;
  };

  // ---- receiver side ------------------------------------------------------------------

  struct accept_state;

  // One admitted sender's socket, read for notices until it ends.
  struct peer_state {
    peer_state(socket_type s, std::uint32_t id) : socket(std::move(s)), sender(id) {}
    socket_type socket;
    std::uint32_t sender;
    detail::notice_frame incoming{};
    bool gone = false;
  };

  struct receiver_state {
    receiver_state(const Executor& ex, std::string p, shm_options o)
        : executor(ex), path(std::move(p)), options(o), acceptor(ex), notices(ex, o.notice_depth) {}
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
    std::weak_ptr<accept_state> accepting;
    bool path_bound = false, accepted = false, closed = false;

    void unlink_path() noexcept {
      if (path_bound) ::unlink(path.c_str());
      path_bound = false;
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
  };

  static void retire(const std::shared_ptr<receiver_state>& s, const std::shared_ptr<peer_state>& p,
                     std::error_code why) {
    if (p->gone) return;
    p->gone = true;
    std::error_code ignored;
    p->socket.close(ignored);
    if (auto it = s->peers.find(p->sender); it != s->peers.end() && it->second == p) s->peers.erase(it);
    // async_send, not try_send: a full queue must delay the departure, never lose it.
    if (!s->closed)
      s->notices.async_send(why, notice{p->sender, notice_kind::abort, 0}, [](std::error_code) {});
  }

  static void read_notice(std::shared_ptr<receiver_state> s, std::shared_ptr<peer_state> p) {
    auto& peer = *p;
    asio::async_read(
        peer.socket, asio::buffer(peer.incoming),
        [s = std::move(s), p = std::move(p)](std::error_code ec, std::size_t) mutable {
          if (p->gone || s->closed) return;
          if (ec) return retire(s, p, make_error_code(errc::peer_disconnected));
          notice n;
          if (detail::decode_notice(p->incoming, p->sender, n))
            return retire(s, p, make_error_code(errc::protocol_error));
          // The ack goes out once the notice is queued here, so the sender's success means
          // this process holds it. With room in the queue that is now, within this handler:
          // a receiver that exits right after taking its last notice has acknowledged it.
          if (s->notices.try_send(std::error_code{}, n)) return acknowledge(std::move(s), std::move(p));
          auto& channel = s->notices;
          channel.async_send(std::error_code{}, n, [s = std::move(s), p = std::move(p)](std::error_code ec) mutable {
            if (ec || p->gone || s->closed) return;
            acknowledge(std::move(s), std::move(p));
          });
        });
  }

  static void acknowledge(std::shared_ptr<receiver_state> s, std::shared_ptr<peer_state> p) {
    auto& peer = *p;
    asio::async_write(peer.socket, asio::buffer(peer.incoming),
                      [s = std::move(s), p = std::move(p)](std::error_code ec, std::size_t) mutable {
                        if (p->gone || s->closed) return;
                        if (ec) return retire(s, p, make_error_code(errc::peer_disconnected));
                        read_notice(std::move(s), std::move(p));
                      });
  }

  using accept_completion = completion_base<std::error_code, std::uint32_t>;

  // A handshake runs once per connection; its sockets and buffers are shared with the socket
  // operations, so the op (the handler) can go the moment the result is known.
  struct accept_state {
    explicit accept_state(std::shared_ptr<receiver_state> r)
        : receiver(std::move(r)), socket(receiver->executor), timer(receiver->executor) {}
    std::shared_ptr<receiver_state> receiver;
    op_ptr<accept_completion> op;  // empty once completed
    socket_type socket;
    timer_type timer;
    detail::hello_frame hello{};
    sender_identity who;
    std::string payload;
  };

  static void accept_finish(const std::shared_ptr<accept_state>& a, std::error_code ec,
                            std::uint32_t sender = 0) {
    auto op = std::move(a->op);
    if (!op) return;
    auto& s = *a->receiver;
    std::error_code ignored;
    if (s.accepting.lock() == a) {
      s.accepting.reset();
      s.acceptor.cancel(ignored);  // a pending accept would take a sender and drop it
    }
    a->socket.close(ignored);  // a refused peer reads its verdict, then end of file
    a->timer.cancel();
    op.release()->complete(detail::shm_system_error(ec), sender);
  }

  static void accept_start(std::shared_ptr<accept_state> a) {
    auto& s = *a->receiver;
    if (s.closed) return accept_finish(a, make_error_code(errc::not_connected));
    if (!s.accepting.expired()) return accept_finish(a, make_error_code(errc::invalid_argument));
    s.accepting = a;
    auto& socket = a->socket;
    s.acceptor.async_accept(socket, [a = std::move(a)](std::error_code ec) mutable {
      if (!a->op) return;
      if (ec) return accept_finish(a, ec);
      a->timer.expires_after(a->receiver->options.connect_timeout);
      a->timer.async_wait([w = std::weak_ptr<accept_state>(a)](std::error_code ec) {
        if (auto a = w.lock(); a && !ec) accept_finish(a, std::make_error_code(std::errc::timed_out));
      });
      auto& st = *a;
      asio::async_read(st.socket, asio::buffer(st.hello), [a = std::move(a)](std::error_code ec, std::size_t) mutable {
        judge(std::move(a), ec);
      });
    });
  }

  static void judge(std::shared_ptr<accept_state> a, std::error_code ec) {
    if (!a->op) return;
    if (ec) return accept_finish(a, detail::shm_handshake_error(ec));
    auto& s = *a->receiver;
    std::error_code refusal = detail::decode_hello(detail::shm_magic, a->hello, a->who);
    if (!refusal) refusal = s.admitted.check(a->who);
    if (!refusal) {
      if (auto it = s.peers.find(a->who.sender); it != s.peers.end()) {
        // A restarted sender can be back before this side has read its predecessor's end.
        if (detail::peer_hung_up(it->second->socket.native_handle()))
          retire(a->receiver, it->second, make_error_code(errc::peer_disconnected));
        else
          refusal = make_error_code(errc::invalid_argument);  // sender N is already connected
      }
    }
    const auto verdict = detail::encode_verdict(refusal);
    const auto sent = detail::send_with_fds(a->socket.native_handle(), verdict, {});
    if (refusal) return accept_finish(a, refusal, a->who.sender);
    if (sent) return accept_finish(a, detail::shm_handshake_error(sent), a->who.sender);

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
    if (auto e = detail::send_with_fds(a->socket.native_handle(), std::as_bytes(std::span(header)), fds))
      return accept_finish(a, detail::shm_handshake_error(e), a->who.sender);
    a->payload = std::move(payload);
    auto& st = *a;
    asio::async_write(st.socket, asio::buffer(st.payload), [a = std::move(a)](std::error_code ec, std::size_t) mutable {
      if (!a->op) return;
      const std::uint32_t id = a->who.sender;
      if (ec) return accept_finish(a, detail::shm_handshake_error(ec), id);
      auto& s = *a->receiver;
      auto p = std::make_shared<peer_state>(std::move(a->socket), id);
      s.peers[id] = p;
      s.accepted = true;
      read_notice(a->receiver, std::move(p));
      accept_finish(a, {}, id);
    });
  }

  // ---- sender side --------------------------------------------------------------------

  enum class link_status { open, closed, failed };

  struct connection_state;

  // A write or a notice, in the connection's queue.
  struct queued_op : completion_base<std::error_code> {
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
  using queued_ptr = op_ptr<queued_op>;

  static void finish(queued_ptr op, std::error_code ec) { op.release()->complete(ec); }

  struct connection_state {
    struct arena {
      std::uint64_t remote = 0;
      std::uint64_t length = 0;
      detail::mapping map;
    };
    struct expected_ack {
      detail::notice_frame frame;
      std::uint64_t id;  // of the notice op; gone from the queue if it was cancelled
    };
    connection_state(const Executor& ex, std::shared_ptr<asio::thread_pool> p, shm_options o,
                     socket_type s, sender_identity w)
        : executor(ex), pool(std::move(p)), options(o), socket(std::move(s)), who(w) {}

    Executor executor;
    std::shared_ptr<asio::thread_pool> pool;
    shm_options options;
    socket_type socket;
    sender_identity who;
    region_table table;
    std::vector<arena> arenas;  // indexed by a region's key
    std::deque<queued_ptr> queue;  // the front runs, the rest wait
    std::deque<expected_ack> acks;  // notices sent, oldest first
    std::deque<detail::notice_frame> outbox;  // frames to write, one write at a time
    bool writing = false;
    detail::notice_frame ack_in{};
    link_status status = link_status::open;
    std::error_code failure;  // why the link failed, for later operations
    std::uint64_t next_id = 0;

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
    if (op->running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Every byte is in the shared pages before the io thread reports or notifies.
      std::atomic_thread_fence(std::memory_order_release);
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
    if (op.is_notice) {
      s->acks.push_back({op.frame, op.id});
      s->outbox.push_back(op.frame);
      return send_frames(s);
    }
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

  static void send_frames(std::shared_ptr<connection_state> s) {
    if (s->writing || s->outbox.empty()) return;
    s->writing = true;
    auto& st = *s;
    asio::async_write(st.socket, asio::buffer(st.outbox.front()),
                      [s = std::move(s)](std::error_code ec, std::size_t) mutable {
                        s->writing = false;
                        if (s->status != link_status::open) return;
                        if (ec) return shut(s, link_status::failed, make_error_code(errc::peer_disconnected));
                        s->outbox.pop_front();
                        send_frames(std::move(s));
                      });
  }

  // Reads acks for as long as the link is open; its end is how a dead receiver is noticed.
  static void watch(std::shared_ptr<connection_state> s) {
    auto& st = *s;
    asio::async_read(st.socket, asio::buffer(st.ack_in), [s = std::move(s)](std::error_code ec, std::size_t) mutable {
      if (s->status != link_status::open) return;
      if (ec) return shut(s, link_status::failed, make_error_code(errc::peer_disconnected));
      if (s->acks.empty() || s->acks.front().frame != s->ack_in)
        return shut(s, link_status::failed, make_error_code(errc::protocol_error));
      const auto id = s->acks.front().id;
      s->acks.pop_front();
      if (!s->queue.empty() && s->queue.front()->id == id) finish_front(s, {});
      watch(std::move(s));
    });
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
    std::error_code ignored;
    s->socket.close(ignored);
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
        // A notice already sent stays sent; watch() drops its ack when it comes.
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
    /// Listens at `socket_path` (a stale socket file there is removed). Throws
    /// shardline::error naming the path and the cause.
    receiver(const executor_type& ex, std::string socket_path, shm_options options = {})
        : state_(std::make_shared<receiver_state>(ex, std::move(socket_path), options)) {
      auto& s = *state_;
      if (auto ec = path_error(s.path))
        throw error(ec, "shm receiver: socket path '" + s.path + "' must be 1 to " +
                            std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) + " bytes");
      struct stat st {};
      if (::lstat(s.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(s.path.c_str());
      std::error_code ec;
      auto check = [&](const char* what) {
        ec = detail::shm_system_error(ec);
        if (ec) throw error(ec, "shm receiver: cannot " + std::string(what) + " socket '" + s.path + "': " + ec.message());
      };
      s.acceptor.open(asio::local::stream_protocol(), ec);
      check("open a");
      s.acceptor.bind(asio::local::stream_protocol::endpoint(s.path), ec);
      check("bind");
      s.path_bound = true;
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
    /// and, once connected, in every sender. Throws shardline::error: errc::invalid_argument
    /// for 0 bytes, past 253 arenas, or once a sender has connected (senders receive the
    /// arenas when they connect); the system error of memfd_create, ftruncate or mmap.
    std::span<std::byte> allocate(std::size_t bytes) {
      auto& s = *state_;
      const auto where = "shm receiver '" + s.path + "': arena of " + std::to_string(bytes) + " bytes: ";
      if (bytes == 0) throw error(make_error_code(errc::invalid_argument), where + "an arena cannot be empty");
      if (s.arenas.size() >= detail::max_fds_per_message)
        throw error(make_error_code(errc::invalid_argument), where + "more than 253 arenas");
      if (s.accepted)
        throw error(make_error_code(errc::invalid_argument), where + "allocated after a sender connected");
      detail::unique_fd fd(::memfd_create("shardline-arena", MFD_CLOEXEC));
      if (!fd.valid()) {
        auto ec = detail::last_system_error();
        throw error(ec, where + "memfd_create failed: " + ec.message());
      }
      if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
        auto ec = detail::last_system_error();
        throw error(ec, where + "ftruncate failed: " + ec.message());
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
      const auto region = "region '" + e.name + "'";
      require_kind(destination_kinds, e.location, "the shm transport", "shm receiver: " + region);
      const auto arena = s.arena_of(e.bytes);
      if (arena < 0)
        throw error(make_error_code(errc::unsupported_memory),
                    "shm receiver: " + region +
                        " is not inside an arena this receiver allocated: the shm transport can "
                        "share only its own memfd arenas (allocate() them, or use "
                        "weights_receiver's layout mode)");
      if (s.accepted)
        throw error(make_error_code(errc::invalid_argument),
                    "shm receiver: " + region + " exposed after a sender connected");
      try {
        s.table.add({std::move(e.name), reinterpret_cast<std::uintptr_t>(e.bytes.data()), e.bytes.size(),
                     static_cast<std::uint32_t>(arena), e.location, std::move(e.layout)});
      } catch (const error& x) {
        throw error(x.code(), "shm receiver: " + std::string(x.what()));
      }
    }

    /// expose({name, bytes}): a host byte region without a layout.
    void expose(std::string name, std::span<std::byte> bytes) { expose({std::move(name), bytes, {}, {}}); }

    /// Whom later handshakes admit; senders already connected stay.
    void admit(admission a) noexcept { state_->admitted = a; }

    /// Addresses are this process's addresses; a region's key is its arena's index.
    const region_table& regions() const noexcept { return state_->table; }

    /// Accepts one sender: completion void(std::error_code, std::uint32_t sender). Call it
    /// again for each further sender; the socket keeps listening until close(), and peers
    /// queue in its backlog meanwhile.
    ///
    /// The handshake reads the sender's hello, checks it against admit()'s admission and the
    /// senders connected now, answers with a verdict and, when admitted, hands over the
    /// arenas and the region table. `sender` is the id the peer claimed (0 when its hello did
    /// not parse). Errors, each ending this peer's connection only (the receiver goes on
    /// listening, call again): errc::protocol_error (not a shardline hello),
    /// errc::protocol_version_mismatch (another control protocol version), errc::unknown_sender
    /// or errc::plan_mismatch (refused by admission), errc::invalid_argument (sender `sender`
    /// is already connected; a predecessor whose end this side has not read yet counts as
    /// gone once its socket shows end of file), std::errc::timed_out (the peer took longer
    /// than options.connect_timeout), errc::peer_disconnected (the peer left mid-handshake).
    /// Errors of the receiver: errc::not_connected after close(), operation_aborted when
    /// close() ends a pending accept, errc::invalid_argument when another async_accept is
    /// pending.
    ///
    /// Cancellation (any type): completes with operation_aborted unless it completed first;
    /// a peer in mid-handshake is dropped. Never completes inline.
    template <class Token>
    auto async_accept(Token&& token) {
      return asio::async_initiate<Token, void(std::error_code, std::uint32_t)>(
          [s = state_](auto handler) {
            using handler_type = decltype(handler);
            auto a = std::make_shared<accept_state>(s);
            auto slot = asio::get_associated_cancellation_slot(handler);
            a->op = handler_op<accept_completion, handler_type, std::error_code, std::uint32_t>::create(
                std::move(handler), s->executor);
            if (slot.is_connected())
              // Posted: completing here would clear the slot from inside its own handler.
              slot.assign([w = std::weak_ptr<accept_state>(a), ex = s->executor](asio::cancellation_type) {
                asio::post(ex, [w] {
                  if (auto a = w.lock()) accept_finish(a, asio::error::operation_aborted);
                });
              });
            accept_start(std::move(a));
          },
          token);
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
      if (auto a = s.accepting.lock()) accept_finish(a, asio::error::operation_aborted);
      for (auto& [id, p] : s.peers) {
        p->gone = true;
        p->socket.close(ignored);
      }
      s.peers.clear();
      s.unlink_path();
      s.notices.cancel();
    }

  private:
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
            auto op = handler_op<queued_op, decltype(handler), std::error_code>::create(std::move(handler), ex);
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
            auto op = handler_op<queued_op, decltype(handler), std::error_code>::create(std::move(handler), ex);
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
  /// the verdict and, when admitted, the receiver's arenas and region table, and maps them
  /// (MAP_POPULATE: the page-table cost is paid here rather than in the first writes).
  /// Completion void(std::error_code, connection). Errors: the receiver's refusal
  /// (errc::unknown_sender, errc::plan_mismatch, errc::invalid_argument when a sender with
  /// this id is connected, errc::protocol_version_mismatch); the system error of connect
  /// (e.g. no_such_file_or_directory, connection_refused); std::errc::timed_out after
  /// options.connect_timeout; errc::peer_disconnected when the receiver went away
  /// mid-handshake; errc::protocol_error for a malformed handshake; errc::invalid_argument
  /// for a path too long for a Unix socket. Cancellable (any type) through the handler's
  /// cancellation slot: operation_aborted.
  template <class Token>
  auto async_connect(std::string socket_path, sender_identity who, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code, connection)>(
        [this](auto handler, std::string path, sender_identity who) {
          using handler_type = decltype(handler);
          auto c = std::make_shared<connect_state>(executor_, pool_, options_, std::move(path), who);
          auto slot = asio::get_associated_cancellation_slot(handler);
          c->op = handler_op<connect_completion, handler_type, std::error_code, connection>::create(
              std::move(handler), executor_);
          if (slot.is_connected())
            slot.assign([w = std::weak_ptr<connect_state>(c), ex = executor_](asio::cancellation_type) {
              asio::post(ex, [w] {
                if (auto c = w.lock()) connect_finish(c, asio::error::operation_aborted);
              });
            });
          connect_start(std::move(c));
        },
        token, std::move(socket_path), who);
  }

  /// async_connect(socket_path, sender_identity{}, token): sender 0, no plan.
  template <class Token>
  auto async_connect(std::string socket_path, Token&& token) {
    return async_connect(std::move(socket_path), sender_identity{}, std::forward<Token>(token));
  }

private:
  using connect_completion = completion_base<std::error_code, connection>;

  struct connect_state {
    connect_state(const Executor& ex, std::shared_ptr<asio::thread_pool> p, shm_options o, std::string path,
                  sender_identity w)
        : executor(ex), pool(std::move(p)), options(o), path(std::move(path)), who(w), socket(ex), timer(ex) {}
    Executor executor;
    std::shared_ptr<asio::thread_pool> pool;
    shm_options options;
    std::string path;
    sender_identity who;
    op_ptr<connect_completion> op;  // empty once completed
    socket_type socket;
    timer_type timer;
    detail::hello_frame hello{};
    std::array<std::byte, detail::verdict_bytes> verdict{};
    std::array<std::byte, detail::shm_header_bytes> header{};
    std::size_t header_got = 0;
    std::vector<detail::unique_fd> fds;
    std::vector<std::byte> payload;
  };

  static void connect_finish(const std::shared_ptr<connect_state>& c, std::error_code ec,
                             std::shared_ptr<connection_state> s = nullptr) {
    auto op = std::move(c->op);
    if (!op) return;
    std::error_code ignored;
    c->socket.close(ignored);
    c->timer.cancel();
    op.release()->complete(detail::shm_system_error(ec), connection(c->executor, std::move(s)));
  }

  static void connect_start(std::shared_ptr<connect_state> c) {
    if (auto e = path_error(c->path)) return connect_finish(c, e);
    c->timer.expires_after(c->options.connect_timeout);
    c->timer.async_wait([w = std::weak_ptr<connect_state>(c)](std::error_code ec) {
      if (auto c = w.lock(); c && !ec) connect_finish(c, std::make_error_code(std::errc::timed_out));
    });
    auto& st = *c;
    st.socket.async_connect(asio::local::stream_protocol::endpoint(st.path), [c = std::move(c)](std::error_code ec) mutable {
      if (!c->op) return;
      if (ec) return connect_finish(c, ec);
      c->hello = detail::encode_hello(detail::shm_magic, c->who);
      auto& st = *c;
      asio::async_write(st.socket, asio::buffer(st.hello), [c = std::move(c)](std::error_code ec, std::size_t) mutable {
        if (!c->op) return;
        if (ec) return connect_finish(c, detail::shm_handshake_error(ec));
        auto& st = *c;
        asio::async_read(st.socket, asio::buffer(st.verdict), [c = std::move(c)](std::error_code ec, std::size_t) mutable {
          if (!c->op) return;
          if (ec) return connect_finish(c, detail::shm_handshake_error(ec));
          if (auto refusal = detail::decode_verdict(c->verdict)) return connect_finish(c, refusal);
          connect_header(std::move(c));
        });
      });
    });
  }

  // The header comes with the descriptors, so it is read with recvmsg when readable.
  static void connect_header(std::shared_ptr<connect_state> c) {
    auto& st = *c;
    st.socket.async_wait(asio::socket_base::wait_read, [c = std::move(c)](std::error_code ec) mutable {
      if (!c->op) return;
      if (ec) return connect_finish(c, detail::shm_handshake_error(ec));
      bool truncated = false;
      std::error_code e;
      const auto want = std::span(c->header).subspan(c->header_got);
      const std::size_t n = detail::receive_with_fds(c->socket.native_handle(), want, c->fds, truncated, e);
      if (e && e != std::errc::resource_unavailable_try_again && e != std::errc::operation_would_block)
        return connect_finish(c, detail::shm_handshake_error(e));
      if (!e && n == 0) return connect_finish(c, make_error_code(errc::peer_disconnected));
      if (truncated) return connect_finish(c, make_error_code(errc::protocol_error));
      c->header_got += n;
      if (c->header_got < c->header.size()) return connect_header(std::move(c));
      const auto count = detail::get_le<std::uint32_t>(c->header.data() + 4);
      const auto bytes = detail::get_le<std::uint64_t>(c->header.data() + 8);
      if (std::memcmp(c->header.data(), detail::shm_magic.data(), 4) != 0 || count != c->fds.size() ||
          bytes > detail::shm_max_payload || bytes < 16 * std::uint64_t(count))
        return connect_finish(c, make_error_code(errc::protocol_error));
      c->payload.resize(static_cast<std::size_t>(bytes));
      auto& st = *c;
      asio::async_read(st.socket, asio::buffer(st.payload), [c = std::move(c)](std::error_code ec, std::size_t) mutable {
        if (!c->op) return;
        if (ec) return connect_finish(c, detail::shm_handshake_error(ec));
        connect_map(c);
      });
    });
  }

  static void connect_map(const std::shared_ptr<connect_state>& c) {
    auto s = std::make_shared<connection_state>(c->executor, c->pool, c->options, std::move(c->socket), c->who);
    const std::byte* p = c->payload.data();
    for (auto& fd : c->fds) {
      typename connection_state::arena a;
      a.remote = detail::get_le<std::uint64_t>(p);
      a.length = detail::get_le<std::uint64_t>(p + 8);
      p += 16;
      struct stat info {};
      // A shorter file would SIGBUS our copies; never map past its end.
      if (::fstat(fd.get(), &info) != 0 || a.length == 0 || static_cast<std::uint64_t>(info.st_size) < a.length)
        return connect_finish(c, make_error_code(errc::protocol_error));
      std::error_code e;
      a.map = detail::mapping::map_shared(fd.get(), static_cast<std::size_t>(a.length), MAP_POPULATE, e);
      if (e) return connect_finish(c, e);
      s->arenas.push_back(std::move(a));
    }
    std::error_code e;
    s->table = region_table::parse(
        std::string_view(reinterpret_cast<const char*>(p),
                         static_cast<std::size_t>(c->payload.data() + c->payload.size() - p)),
        e);
    if (e) return connect_finish(c, e);
    // Writes translate through the region's arena: a region outside it would be a write
    // outside the mapping.
    for (const auto& r : s->table.regions()) {
      if (r.key >= s->arenas.size()) return connect_finish(c, make_error_code(errc::protocol_error));
      const auto& a = s->arenas[r.key];
      if (r.address < a.remote || r.length > a.length || r.address - a.remote > a.length - r.length)
        return connect_finish(c, make_error_code(errc::protocol_error));
    }
    watch(s);
    connect_finish(c, {}, std::move(s));
  }

  executor_type executor_;
  shm_options options_;
  std::shared_ptr<asio::thread_pool> pool_;
};

using shm_transport = basic_shm_transport<>;

static_assert(transport<shm_transport>);

}  // namespace shardline
