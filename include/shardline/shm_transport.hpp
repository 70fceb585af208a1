// shardline/shm_transport.hpp: two processes on one host. The receiver (rollout) maps its
// arenas from memfds and hands them to the sender (trainer) over a Unix socket; the sender
// maps them too and copies into them on worker threads, never on the io_context.
#pragma once

#include <shardline/detail/completion.hpp>
#include <shardline/detail/shm_handles.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/basic_socket_acceptor.hpp>
#include <asio/basic_stream_socket.hpp>
#include <asio/basic_waitable_timer.hpp>
#include <asio/buffer.hpp>
#include <asio/error.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/recycling_allocator.hpp>
#include <asio/associated_allocator.hpp>
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
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
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
  std::chrono::milliseconds connect_timeout{10000};
};

namespace detail {
// Handshake, receiver -> sender: a 16-byte header carrying the arena memfds as SCM_RIGHTS
// ("SLSH", u32 arena count, u64 payload bytes), then the payload: per arena its base
// address in the receiver and its length (u64 each), then region_table::serialize().
// After it the receiver sends nothing; the sender sends one u32 per notification.
inline constexpr std::size_t shm_header_bytes = 16;
inline constexpr std::uint64_t shm_max_payload = std::uint64_t(1) << 30;

inline void shm_put(std::string& out, std::uint64_t v, int bytes = 8) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
inline std::uint64_t shm_get(const std::byte* p, int bytes = 8) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= std::uint64_t(std::to_integer<unsigned char>(p[i])) << (8 * i);
  return v;
}

// Asio reports syscall failures in its own "asio.system" category, which does not compare
// equal to std::errc values; ours use std::system_category. operation_aborted stays Asio's,
// as every Asio user compares with asio::error::operation_aborted.
inline std::error_code shm_system_error(std::error_code ec) noexcept {
  if (ec && ec.category() == asio::error::get_system_category() && ec != asio::error::operation_aborted)
    return {ec.value(), std::system_category()};
  return ec;
}
}  // namespace detail

/// Shared-memory transport between two processes of one host.
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
  using notification_channel =
      asio::experimental::channel<Executor, void(std::error_code, std::uint32_t)>;

  static std::error_code path_error(const std::string& path) {
    if (path.empty() || path.size() >= sizeof(sockaddr_un{}.sun_path))
      return make_error_code(errc::invalid_argument);
    return {};
  }

  // ---- receiver side ------------------------------------------------------------------

  struct receiver_state {
    receiver_state(const Executor& ex, std::string p, shm_options o)
        : executor(ex), path(std::move(p)), options(o), acceptor(ex), socket(ex),
          notifications(ex, 16) {}
    struct arena {
      detail::unique_fd fd;
      detail::mapping map;
    };
    Executor executor;
    std::string path;
    shm_options options;
    acceptor_type acceptor;
    socket_type socket;
    std::vector<arena> arenas;
    region_table table;
    notification_channel notifications;
    std::error_code terminal;  // set once: later waits complete with it
    std::string outgoing;
    std::array<std::byte, 4> incoming{};
    bool path_bound = false, accepting = false, accepted = false, closed = false;

    void unlink_path() noexcept {
      if (path_bound) ::unlink(path.c_str());
      path_bound = false;
    }
  };

  static void read_notifications(std::shared_ptr<receiver_state> s) {
    auto& st = *s;
    asio::async_read(st.socket, asio::buffer(st.incoming),
                     [s = std::move(s)](std::error_code ec, std::size_t) mutable {
                       if (s->closed) return;
                       if (ec) {
                         // The sender closed or died: a waiting (or the next) wait learns it.
                         s->terminal = make_error_code(errc::peer_disconnected);
                         s->notifications.try_send(s->terminal, std::uint32_t{0});
                         return;
                       }
                       const auto value = static_cast<std::uint32_t>(detail::shm_get(s->incoming.data(), 4));
                       auto& channel = s->notifications;
                       channel.async_send(std::error_code{}, value,
                                          [s = std::move(s)](std::error_code ec) mutable {
                                            if (!ec && !s->closed) read_notifications(std::move(s));
                                          });
                     });
  }

  template <class Handler>
  struct accept_op {
    std::shared_ptr<receiver_state> s;
    Handler handler;
    int stage = 0;

    void operator()(std::error_code ec = {}, std::size_t = 0) {
      auto& st = *s;
      switch (stage) {
        case 0: {
          if (st.closed || !st.acceptor.is_open() || st.accepting)
            return finish(make_error_code(errc::not_connected));
          st.accepting = true;
          auto slot = asio::get_associated_cancellation_slot(handler);
          if (slot.is_connected())
            slot.assign([p = s.get()](asio::cancellation_type) {
              std::error_code ignored;
              p->acceptor.cancel(ignored);
              p->socket.cancel(ignored);
            });
          stage = 1;
          st.acceptor.async_accept(st.socket, std::move(*this));
          return;
        }
        case 1: {
          if (ec) return finish(ec);
          std::error_code ignored;
          st.acceptor.close(ignored);  // one sender per receiver
          st.unlink_path();
          std::vector<int> fds;
          std::string payload;
          for (const auto& a : st.arenas) {
            fds.push_back(a.fd.get());
            detail::shm_put(payload, reinterpret_cast<std::uintptr_t>(a.map.data()));
            detail::shm_put(payload, a.map.size());
          }
          payload += st.table.serialize();
          std::string header = "SLSH";
          detail::shm_put(header, fds.size(), 4);
          detail::shm_put(header, payload.size());
          st.outgoing = std::move(payload);
          if (auto e = detail::send_with_fds(st.socket.native_handle(),
                                             std::as_bytes(std::span(header)), fds))
            return finish(e);
          stage = 2;
          asio::async_write(st.socket, asio::buffer(st.outgoing), std::move(*this));
          return;
        }
        default: {
          if (ec) return finish(ec);
          st.accepted = true;
          st.outgoing.clear();
          read_notifications(s);
          return finish({});
        }
      }
    }

    void finish(std::error_code ec) {
      s->accepting = false;
      auto slot = asio::get_associated_cancellation_slot(handler);
      if (slot.is_connected()) slot.clear();
      detail::post_completion(s->executor, std::move(handler), detail::shm_system_error(ec));
    }
  };

  // ---- sender side --------------------------------------------------------------------

  enum class link_status { open, closed, disconnected };

  struct connection_state;

  struct write_op_base {
    struct piece {
      std::byte* destination;
      const std::byte* source;
      std::size_t size;
    };
    virtual ~write_op_base() = default;
    virtual void complete(std::error_code ec) = 0;
    virtual void destroy() noexcept = 0;  // frees with the handler's allocator

    std::shared_ptr<connection_state> owner;  // keeps the mappings alive under the copies
    std::vector<piece> pieces;
    std::atomic<std::size_t> next{0};
    std::atomic<std::size_t> running{0};
    std::atomic<bool> stop{false};
    std::error_code abort_reason;  // io thread only, as the fields below
    std::uint64_t id = 0;
    bool started = false;
    bool notify = false;
    std::array<std::byte, 4> notification{};
  };

  struct op_deleter {
    void operator()(write_op_base* op) const noexcept { op->destroy(); }
  };
  using op_ptr = std::unique_ptr<write_op_base, op_deleter>;

  template <class Handler>
  struct write_op final : write_op_base {
    using handler_executor = asio::associated_executor_t<Handler, Executor>;
    using allocator_type = typename std::allocator_traits<asio::associated_allocator_t<
        Handler, asio::recycling_allocator<void>>>::template rebind_alloc<write_op>;
    using allocator_traits = std::allocator_traits<allocator_type>;

    // Allocated with the handler's associated allocator (Asio's recycling one by default);
    // ops are created and destroyed on the io thread only.
    static op_ptr create(Handler&& h, const Executor& io) {
      allocator_type alloc(asio::get_associated_allocator(h, asio::recycling_allocator<void>()));
      write_op* p = allocator_traits::allocate(alloc, 1);
      try {
        return op_ptr(new (p) write_op(std::move(h), io, alloc));
      } catch (...) {
        allocator_traits::deallocate(alloc, p, 1);
        throw;
      }
    }

    write_op(Handler&& h, const Executor& io, const allocator_type& a)
        : alloc(a), io_executor(io),
          handler_work(asio::make_work_guard(asio::get_associated_executor(h, io))),
          io_work(asio::make_work_guard(io)), handler(std::move(h)) {}

    void destroy() noexcept override {
      allocator_type a(alloc);
      this->~write_op();
      allocator_traits::deallocate(a, this, 1);
    }

    void complete(std::error_code ec) override {
      auto slot = asio::get_associated_cancellation_slot(handler);
      if (slot.is_connected()) slot.clear();
      detail::post_completion(io_executor, std::move(handler), ec);
      handler_work.reset();
      io_work.reset();
    }

    allocator_type alloc;
    Executor io_executor;
    decltype(asio::make_work_guard(std::declval<handler_executor&>())) handler_work;
    decltype(asio::make_work_guard(std::declval<Executor&>())) io_work;
    Handler handler;
  };

  struct connection_state : std::enable_shared_from_this<connection_state> {
    struct arena {
      std::uint64_t remote = 0;
      std::uint64_t length = 0;
      detail::mapping map;
    };
    connection_state(const Executor& ex, std::shared_ptr<asio::thread_pool> p, shm_options o,
                     socket_type s)
        : executor(ex), pool(std::move(p)), options(o), socket(std::move(s)) {}

    Executor executor;
    std::shared_ptr<asio::thread_pool> pool;
    shm_options options;
    socket_type socket;
    region_table table;
    std::vector<arena> arenas;
    std::deque<op_ptr> queue;  // front runs, the rest wait
    link_status status = link_status::open;
    std::uint64_t next_id = 0;
    std::array<std::byte, 64> scratch{};

    // Validates the whole batch before any byte moves, then cuts it into pieces.
    std::error_code translate(std::span<const write_request> batch, write_op_base& op) const {
      const std::size_t chunk = options.chunk_bytes ? options.chunk_bytes : SIZE_MAX;
      for (const auto& w : batch) {
        const std::uint64_t n = w.source.size();
        if (!table.find(w.remote_address, n)) return make_error_code(errc::region_not_exposed);
        const arena* hit = nullptr;
        for (const auto& a : arenas)
          if (w.remote_address >= a.remote && n <= a.length && w.remote_address - a.remote <= a.length - n)
            hit = &a;
        if (!hit) return make_error_code(errc::region_not_exposed);
        std::byte* dst = hit->map.data() + (w.remote_address - hit->remote);
        for (std::uint64_t off = 0; off < n; off += chunk)
          op.pieces.push_back({dst + off, w.source.data() + off, static_cast<std::size_t>(std::min<std::uint64_t>(chunk, n - off))});
      }
      return {};
    }
  };

  static void copy_task(write_op_base* op) {
    while (!op->stop.load(std::memory_order_relaxed)) {
      const std::size_t i = op->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= op->pieces.size()) break;
      const auto& p = op->pieces[i];
      std::memcpy(p.destination, p.source, p.size);
    }
    if (op->running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Every byte is in the shared pages before the io thread reports or notifies.
      std::atomic_thread_fence(std::memory_order_release);
      auto owner = op->owner;
      auto ex = owner->executor;
      // From here on `op` belongs to the io thread again.
      asio::post(ex, [owner = std::move(owner)]() mutable { copies_done(std::move(owner)); });
    }
  }

  static void start_front(const std::shared_ptr<connection_state>& s) {
    if (s->queue.empty() || s->queue.front()->started) return;
    auto& op = *s->queue.front();
    op.started = true;
    if (op.pieces.empty()) {
      // Nothing to copy (a bare notification): still never complete inline.
      asio::post(s->executor, [owner = s]() mutable { copies_done(std::move(owner)); });
      return;
    }
    const std::size_t tasks = std::min(std::max<std::size_t>(s->options.copy_threads, 1), op.pieces.size());
    op.running.store(tasks, std::memory_order_relaxed);
    for (std::size_t i = 0; i < tasks; ++i) asio::post(*s->pool, [p = &op] { copy_task(p); });
  }

  static void finish_front(const std::shared_ptr<connection_state>& s, std::error_code ec) {
    auto op = std::move(s->queue.front());
    s->queue.pop_front();
    op->complete(ec);
    op.reset();
    start_front(s);
  }

  static void copies_done(std::shared_ptr<connection_state> s) {
    auto& op = *s->queue.front();
    if (op.abort_reason) return finish_front(s, op.abort_reason);
    if (!op.notify) return finish_front(s, {});
    asio::async_write(s->socket, asio::buffer(op.notification),
                      [s](std::error_code ec, std::size_t) {
                        auto& op = *s->queue.front();
                        if (!op.abort_reason && ec) shut(s, link_status::disconnected);
                        finish_front(s, op.abort_reason);
                      });
  }

  // Close or disconnect: waiting ops complete now; the running one after its memcpy.
  static void shut(const std::shared_ptr<connection_state>& s, link_status why) {
    const auto reason = why == link_status::closed
                            ? std::error_code(asio::error::operation_aborted)
                            : make_error_code(errc::peer_disconnected);
    if (s->status == link_status::open) s->status = why;
    else if (why == link_status::closed) s->status = why;
    std::error_code ignored;
    s->socket.close(ignored);
    std::vector<op_ptr> waiting;
    while (!s->queue.empty() && !s->queue.back()->started) {
      waiting.push_back(std::move(s->queue.back()));
      s->queue.pop_back();
    }
    if (!s->queue.empty() && !s->queue.front()->abort_reason) {
      s->queue.front()->abort_reason = reason;
      s->queue.front()->stop.store(true, std::memory_order_relaxed);
    }
    for (auto it = waiting.rbegin(); it != waiting.rend(); ++it) (*it)->complete(reason);
  }

  static void cancel_waiting(const std::shared_ptr<connection_state>& s, std::uint64_t id) {
    for (auto it = s->queue.begin(); it != s->queue.end(); ++it)
      if ((*it)->id == id) {
        if ((*it)->started) return;  // mid-copy: it finishes
        auto op = std::move(*it);
        s->queue.erase(it);
        op->complete(asio::error::operation_aborted);
        return;
      }
  }

  static void watch(std::shared_ptr<connection_state> s) {
    auto& st = *s;
    st.socket.async_read_some(asio::buffer(st.scratch),
                              [s = std::move(s)](std::error_code ec, std::size_t) mutable {
                                if (s->status != link_status::open) return;
                                if (!ec) return watch(std::move(s));  // nothing is expected; ignore
                                shut(s, link_status::disconnected);
                              });
  }

public:
  using executor_type = Executor;

  explicit basic_shm_transport(const executor_type& ex, shm_options options = {})
      : executor_(ex), options_(options),
        pool_(std::make_shared<asio::thread_pool>(std::max<std::size_t>(options.copy_threads, 1))) {}

  executor_type get_executor() const noexcept { return executor_; }

  /// The sender's memory needs no registration: copies read it in place.
  using registration = unregistered_memory;

  registration register_memory(std::span<std::byte> bytes) {
    return registration{bytes};
  }

  /// The rollout side: owns the arenas (memfd + MAP_SHARED) and listens on a Unix socket
  /// for one sender. Move-only; closes on destruction.
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
    receiver(receiver&&) noexcept = default;
    receiver& operator=(receiver&& o) noexcept {
      if (this != &o) {
        close();
        state_ = std::move(o.state_);
      }
      return *this;
    }
    ~receiver() { close(); }

    /// Where its completions run (the rollout's io_context).
    executor_type get_executor() const noexcept { return state_->executor; }

    /// A zeroed arena of `bytes` the sender may write into once connected: a memfd mapped
    /// MAP_SHARED here and, after async_accept, in the sender. Allocate before accepting.
    std::span<std::byte> allocate(std::size_t bytes) {
      auto& s = *state_;
      const auto where = "shm receiver '" + s.path + "': arena of " + std::to_string(bytes) + " bytes: ";
      if (bytes == 0) throw error(make_error_code(errc::invalid_argument), where + "an arena cannot be empty");
      if (s.arenas.size() >= detail::max_fds_per_message)
        throw error(make_error_code(errc::invalid_argument), where + "more than 253 arenas");
      if (s.accepted)
        throw error(make_error_code(errc::invalid_argument), where + "allocated after the sender connected");
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
      s.arenas.push_back({std::move(fd), std::move(map)});
      return span;
    }

    /// Names `bytes` (inside an allocated arena) for the sender. Throws shardline::error
    /// (errc::invalid_argument) naming the region otherwise, or after the sender connected.
    void expose(std::string name, std::span<std::byte> bytes) {
      auto& s = *state_;
      bool inside = false;
      for (const auto& a : s.arenas)
        inside |= local_region{a.map.data(), a.map.size(), 0}.contains(bytes.data(), bytes.size());
      if (!inside)
        throw error(make_error_code(errc::invalid_argument),
                    "shm receiver: region '" + name + "' is not inside an allocated arena");
      if (s.accepted)
        throw error(make_error_code(errc::invalid_argument),
                    "shm receiver: region '" + name + "' exposed after the sender connected");
      s.table.add({std::move(name), reinterpret_cast<std::uintptr_t>(bytes.data()), bytes.size(), 0});
    }

    /// Addresses are this process's addresses.
    const region_table& regions() const noexcept { return state_->table; }

    /// Completion void(std::error_code): one sender connected and received the arenas and
    /// the region table. Cancellable (any cancellation type) until then.
    template <class Token>
    auto async_accept(Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [s = state_](auto handler) {
            accept_op<decltype(handler)>{s, std::move(handler)}();
          },
          token);
    }

    /// Completion void(std::error_code, std::uint32_t): the sender's notifications, in
    /// order, each after its batch's bytes are visible here. When the sender is gone the
    /// next wait completes with errc::peer_disconnected; after close(), a pending wait
    /// completes with asio::experimental::error::channel_cancelled and later ones with
    /// errc::not_connected. Cancellable through the handler's cancellation slot.
    template <class Token>
    auto async_wait_notification(Token&& token) {
      return asio::async_initiate<Token, void(std::error_code, std::uint32_t)>(
          [s = state_](auto handler) {
            if (s->closed || (s->terminal && !s->notifications.ready())) {
              detail::post_completion(s->executor, std::move(handler),
                                      s->closed ? make_error_code(errc::not_connected) : s->terminal,
                                      std::uint32_t{0});
              return;
            }
            s->notifications.async_receive(std::move(handler));
          },
          token);
    }

    /// Stops listening, closes the socket (the sender sees errc::peer_disconnected) and
    /// removes the socket file. The arenas stay mapped here until destruction.
    void close() noexcept {
      if (!state_ || state_->closed) return;
      auto& s = *state_;
      s.closed = true;
      s.terminal = make_error_code(errc::not_connected);
      std::error_code ignored;
      s.acceptor.close(ignored);
      s.socket.close(ignored);
      s.unlink_path();
      s.notifications.cancel();
    }

  private:
    std::shared_ptr<receiver_state> state_;
  };

  /// The trainer side of one link. Move-only; closes on destruction.
  class connection {
  public:
    using executor_type = Executor;

    connection() requires std::default_initializable<Executor> = default;
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

    executor_type get_executor() const noexcept { return executor_; }

    /// The receiver's regions; addresses are the receiver's addresses.
    const region_table& remote_regions() const noexcept {
      static const region_table none;
      return state_ ? state_->table : none;
    }

    bool is_open() const noexcept { return state_ && state_->status == link_status::open; }

    /// Completion void(std::error_code), once every request landed (copied by the worker
    /// threads, split into chunk_bytes pieces). The whole batch is validated first: a request
    /// outside every exposed region fails it with errc::region_not_exposed before any byte
    /// moves. A batch cut short by close() or a disconnect stops after the pieces being
    /// copied, so it may have landed in part. Batches run one after another, in initiation
    /// order. Per-operation cancellation (any type): a batch
    /// whose copies have not started completes with operation_aborted; one already copying
    /// finishes. The receiver gone: errc::peer_disconnected; close(): operation_aborted,
    /// later errc::not_connected.
    template <class Token>
    auto async_write(std::span<const write_request> batch, Token&& token) {
      return initiate(batch, false, 0, std::forward<Token>(token));
    }

    /// As async_write, then the receiver's async_wait_notification completes with
    /// `notification`, after this batch's bytes (and every earlier batch's) are there.
    template <class Token>
    auto async_write_notify(std::span<const write_request> batch, std::uint32_t notification,
                            Token&& token) {
      return initiate(batch, true, notification, std::forward<Token>(token));
    }

    /// Waiting operations complete with operation_aborted now, a copying one after its
    /// memcpy. The mappings go when the last operation is done. Never throws.
    void close() noexcept {
      if (state_ && state_->status != link_status::closed) shut(state_, link_status::closed);
    }

  private:
    friend class basic_shm_transport;
    connection(const Executor& ex, std::shared_ptr<connection_state> s)
        : executor_(ex), state_(std::move(s)) {}

    template <class Token>
    auto initiate(std::span<const write_request> batch, bool notify, std::uint32_t value,
                  Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [ex = executor_, s = state_](auto handler, std::span<const write_request> batch,
                                       bool notify, std::uint32_t value) {
            if (!s || s->status != link_status::open) {
              const bool gone = s && s->status == link_status::disconnected;
              detail::post_completion(ex, std::move(handler),
                                      make_error_code(gone ? errc::peer_disconnected : errc::not_connected));
              return;
            }
            auto slot = asio::get_associated_cancellation_slot(handler);
            auto op = write_op<decltype(handler)>::create(std::move(handler), ex);
            if (auto ec = s->translate(batch, *op)) return op->complete(ec);
            op->owner = s;
            op->notify = notify;
            for (int i = 0; i < 4; ++i) op->notification[i] = std::byte((value >> (8 * i)) & 0xff);
            op->id = ++s->next_id;
            if (slot.is_connected())
              // Posted, not run here: the op must not be destroyed inside its own slot.
              slot.assign([p = s.get(), id = op->id](asio::cancellation_type) {
                asio::post(p->executor, [owner = p->shared_from_this(), id] { cancel_waiting(owner, id); });
              });
            s->queue.push_back(std::move(op));
            start_front(s);
          },
          token, batch, notify, value);
    }

    Executor executor_;
    std::shared_ptr<connection_state> state_;
  };

  /// Completion void(std::error_code, connection): connects to the receiver listening at
  /// `socket_path`, receives its arenas and region table and maps them. Fails with the
  /// system error of connect (e.g. no_such_file_or_directory, connection_refused),
  /// std::errc::timed_out after options.connect_timeout, errc::protocol_error for a
  /// malformed handshake, errc::invalid_argument for a path too long for a Unix socket.
  /// Cancellable (any type) through the handler's cancellation slot. The arenas are mapped
  /// with MAP_POPULATE, so the page-table cost is paid here rather than in the first writes.
  template <class Token>
  auto async_connect(std::string socket_path, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code, connection)>(
        [this](auto handler, std::string path) {
          connect_op<decltype(handler)>::start(executor_, pool_, options_, std::move(path),
                                               std::move(handler));
        },
        token, std::move(socket_path));
  }

private:
  struct connect_state {
    connect_state(const Executor& ex, std::shared_ptr<asio::thread_pool> p, shm_options o, std::string path)
        : executor(ex), pool(std::move(p)), options(o), path(std::move(path)), socket(ex), timer(ex) {}
    Executor executor;
    std::shared_ptr<asio::thread_pool> pool;
    shm_options options;
    std::string path;
    socket_type socket;
    timer_type timer;
    std::array<std::byte, detail::shm_header_bytes> header{};
    std::size_t header_got = 0;
    std::vector<detail::unique_fd> fds;
    std::vector<std::byte> payload;
    bool timed_out = false;
    bool cancelled = false;
  };

  template <class Handler>
  struct connect_op {
    std::shared_ptr<connect_state> c;
    Handler handler;
    int stage = 0;

    static void start(const Executor& ex, std::shared_ptr<asio::thread_pool> pool, shm_options o,
                      std::string path, Handler handler) {
      auto c = std::make_shared<connect_state>(ex, std::move(pool), o, std::move(path));
      connect_op{std::move(c), std::move(handler)}();
    }

    void operator()(std::error_code ec = {}, std::size_t = 0) {
      auto& st = *c;
      // The socket was closed under us: say why, whatever the failing call reported.
      if (st.cancelled) ec = asio::error::operation_aborted;
      else if (st.timed_out && (ec || stage == 2)) ec = std::error_code(ETIMEDOUT, std::system_category());
      switch (stage) {
        case 0: {
          if (auto e = path_error(st.path)) return finish(e);
          auto slot = asio::get_associated_cancellation_slot(handler);
          if (slot.is_connected())
            slot.assign([p = c.get()](asio::cancellation_type) {
              std::error_code ignored;
              p->cancelled = true;
              p->socket.close(ignored);
              p->timer.cancel();
            });
          st.timer.expires_after(st.options.connect_timeout);
          st.timer.async_wait([w = std::weak_ptr<connect_state>(c)](std::error_code ec) {
            auto p = w.lock();
            if (ec || !p) return;
            p->timed_out = true;
            std::error_code ignored;
            p->socket.close(ignored);
          });
          stage = 1;
          st.socket.async_connect(asio::local::stream_protocol::endpoint(st.path), std::move(*this));
          return;
        }
        case 1:
        case 2: {
          if (ec) return finish(ec);
          if (stage == 2) {
            bool truncated = false;
            std::error_code e;
            const auto want = std::span(st.header).subspan(st.header_got);
            const std::size_t n = detail::receive_with_fds(st.socket.native_handle(), want, st.fds, truncated, e);
            if (e && e != std::errc::resource_unavailable_try_again && e != std::errc::operation_would_block)
              return finish(e);
            if (!e && n == 0) return finish(make_error_code(errc::peer_disconnected));
            if (truncated) return finish(make_error_code(errc::protocol_error));
            st.header_got += n;
          }
          stage = 2;
          if (st.header_got < st.header.size()) {
            st.socket.async_wait(asio::socket_base::wait_read, std::move(*this));
            return;
          }
          const std::uint64_t count = detail::shm_get(st.header.data() + 4, 4);
          const std::uint64_t bytes = detail::shm_get(st.header.data() + 8);
          if (std::memcmp(st.header.data(), "SLSH", 4) != 0 || count != st.fds.size() ||
              bytes > detail::shm_max_payload || bytes < 16 * count)
            return finish(make_error_code(errc::protocol_error));
          st.payload.resize(bytes);
          stage = 3;
          asio::async_read(st.socket, asio::buffer(st.payload), std::move(*this));
          return;
        }
        default: {
          if (ec) return finish(ec);
          auto s = std::make_shared<connection_state>(st.executor, st.pool, st.options, std::move(st.socket));
          const std::byte* p = st.payload.data();
          for (auto& fd : st.fds) {
            typename connection_state::arena a;
            a.remote = detail::shm_get(p);
            a.length = detail::shm_get(p + 8);
            p += 16;
            struct stat info {};
            // A shorter file would SIGBUS our copies; never map past its end.
            if (::fstat(fd.get(), &info) != 0 || a.length == 0 ||
                static_cast<std::uint64_t>(info.st_size) < a.length)
              return finish(make_error_code(errc::protocol_error));
            std::error_code e;
            a.map = detail::mapping::map_shared(fd.get(), a.length, MAP_POPULATE, e);
            if (e) return finish(e);
            s->arenas.push_back(std::move(a));
          }
          std::error_code e;
          s->table = region_table::parse(
              std::string_view(reinterpret_cast<const char*>(p),
                               static_cast<std::size_t>(st.payload.data() + st.payload.size() - p)), e);
          if (e) return finish(e);
          watch(s);
          return finish({}, connection(st.executor, std::move(s)));
        }
      }
    }

    void finish(std::error_code ec) { finish(ec, connection(c->executor, nullptr)); }
    void finish(std::error_code ec, connection conn) {
      c->timer.cancel();
      auto slot = asio::get_associated_cancellation_slot(handler);
      if (slot.is_connected()) slot.clear();
      detail::post_completion(c->executor, std::move(handler), detail::shm_system_error(ec),
                              std::move(conn));
    }
  };

  executor_type executor_;
  shm_options options_;
  std::shared_ptr<asio::thread_pool> pool_;
};

using shm_transport = basic_shm_transport<>;

static_assert(transport<shm_transport>);

}  // namespace shardline
