// shardline/cuda/ipc_transport.hpp: GPU to GPU between processes of one host. A receiver
// (rollout) exposes device tensors, its engine's own or allocated here, and exports each
// allocation that holds them once (a legacy CUDA IPC handle, or for VMM memory such as
// PyTorch's expandable segments a shareable file descriptor); a sender (trainer) maps each
// allocation once and writes with cudaMemcpyAsync on its connection's stream, awaiting the
// copies on its io_context. Control (handshake, notices and their acks) runs over a Unix
// socket with the transport kit of shardline/transport/detail/, as the shm transport's does.
#pragma once

#include <shardline/cuda/async_wait.hpp>
#include <shardline/cuda/detail/copy_runs.hpp>
#include <shardline/cuda/detail/ipc_driver.hpp>
#include <shardline/cuda/detail/ipc_wire.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/event.hpp>
#include <shardline/cuda/stream.hpp>
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
#include <asio/associated_cancellation_slot.hpp>
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
#include <asio/write.hpp>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
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

#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace shardline::cuda {

/// Why a sender cannot use what a receiver exported (category "cuda ipc").
enum class ipc_errc {
  foreign_host = 1,    ///< the handles were made on another host, or before this host's last boot
  device_unreachable,  ///< the receiver's memory is on a GPU the sender cannot see or reach
};

namespace detail {
class ipc_error_category_impl final : public std::error_category {
public:
  const char* name() const noexcept override { return "cuda ipc"; }
  std::string message(int value) const override {
    switch (static_cast<ipc_errc>(value)) {
      case ipc_errc::foreign_host:
        return "the receiver's memory handles come from another host or boot: CUDA IPC joins processes of one host";
      case ipc_errc::device_unreachable:
        return "the receiver's memory is on a GPU this sender cannot reach (not visible to it, or no peer access "
               "from its device)";
    }
    return "unknown cuda ipc error";
  }
};
}  // namespace detail

inline const std::error_category& ipc_error_category() noexcept {
  static const detail::ipc_error_category_impl instance;
  return instance;
}

inline std::error_code make_error_code(ipc_errc e) noexcept { return {static_cast<int>(e), ipc_error_category()}; }

}  // namespace shardline::cuda

template <>
struct std::is_error_code_enum<shardline::cuda::ipc_errc> : std::true_type {};

namespace shardline::cuda {

/// Tuning of the CUDA IPC transport.
struct ipc_options {
  /// A sender's GPU: the receiver's allocations are mapped into its context and the copies
  /// run on its streams. A receiver's: where allocate() takes memory.
  int device = 0;
  /// Bounds each handshake: a sender's whole async_connect (imports included), and the part
  /// of a receiver's async_accept after a peer connected.
  std::chrono::milliseconds connect_timeout{10000};
  /// Notices a receiver queues before async_wait_notification takes them. Past it, senders'
  /// notices wait for their acknowledgement; 0: each waits for an async_wait_notification.
  std::size_t notice_depth = 64;
  /// Receivers: handshakes run at once, as shm_options::max_pending_handshakes.
  std::size_t max_pending_handshakes = shardline::detail::default_max_pending_handshakes;
};

namespace detail {

/// Where a receiver's export stands for this sender: in its own process (the receiver's
/// pointers are valid here), importable (same host and boot), or foreign.
enum class ipc_origin { same_process, same_host, foreign };

inline ipc_origin origin_of(const ipc_export& x, std::string_view boot_id, std::uint32_t pid) noexcept {
  if (x.boot_id.empty() || x.boot_id != boot_id) return ipc_origin::foreign;
  return x.pid == pid ? ipc_origin::same_process : ipc_origin::same_host;
}

/// Whether a sender on device `sender` reaches memory on its device `target` (-1: a GPU it
/// does not see), peer access being `peer` (cudaDeviceCanAccessPeer).
inline bool reachable(int sender, int target, bool peer) noexcept { return target >= 0 && (target == sender || peer); }

// Asio reports syscall failures in its own category; ours use std::system_category, as
// the shm transport's do. operation_aborted stays Asio's.
inline std::error_code ipc_system_error(std::error_code ec) noexcept {
  if (ec && ec.category() == asio::error::get_system_category() && ec != asio::error::operation_aborted)
    return {ec.value(), std::system_category()};
  return ec;
}

}  // namespace detail

/// CUDA IPC transport between processes of one host: one receiver, any number of senders,
/// device memory to device memory (or pinned host memory to device memory).
///
/// Thread safety: distinct objects safe; shared objects unsafe. The transport, its
/// connections and receivers must be used from the thread (or strand) of their executor; the
/// copies run on the GPU, and their completions come back through cuda::async_wait.
template <class Executor = asio::any_io_executor>
class basic_ipc_transport {
  using socket_type = asio::basic_stream_socket<asio::local::stream_protocol, Executor>;
  using acceptor_type = asio::basic_socket_acceptor<asio::local::stream_protocol, Executor>;
  using notice_channel = asio::experimental::channel<Executor, void(std::error_code, notice)>;

  static std::error_code path_error(const std::string& path) {
    if (path.empty() || path.size() >= sizeof(sockaddr_un{}.sun_path)) return make_error_code(errc::invalid_argument);
    return {};
  }

  // ---- receiver side ------------------------------------------------------------------

  struct peer_state : shardline::detail::notice_source<socket_type> {
    peer_state(socket_type s, std::uint32_t id) : shardline::detail::notice_source<socket_type>(std::move(s)) {
      this->sender = id;
    }
    bool gone = false;
  };

  struct accept_state {
    explicit accept_state(const Executor& ex) : socket(ex) {}
    socket_type socket;
    std::string payload;
  };

  // One allocation this receiver exported: what goes on the wire, and the descriptor a VMM
  // export made (sent to every sender, closed with the receiver).
  struct exported_allocation {
    detail::ipc_allocation wire;
    shardline::detail::unique_fd fd;
  };

  struct receiver_state : std::enable_shared_from_this<receiver_state> {
    receiver_state(const Executor& ex, std::string p, ipc_options o)
        : executor(ex), path(std::move(p)), options(o), acceptor(ex), notices(ex, o.notice_depth),
          handshakes(std::make_shared<shardline::detail::handshake_listener<Executor, socket_type>>(
              ex, o.max_pending_handshakes)) {}
    Executor executor;
    std::string path;
    ipc_options options;
    acceptor_type acceptor;
    std::vector<device_buffer> arenas;
    std::map<std::uint64_t, exported_allocation> allocations;  // by base
    std::string boot_id = detail::this_boot_id();
    region_table table;
    admission admitted;
    notice_channel notices;
    std::unordered_map<std::uint32_t, std::shared_ptr<peer_state>> peers;
    std::shared_ptr<shardline::detail::handshake_listener<Executor, socket_type>> handshakes;
    bool path_bound = false, accepted = false, closed = false;

    void unlink_path() noexcept {
      if (path_bound) ::unlink(path.c_str());
      path_bound = false;
    }

    detail::ipc_export describe() const {
      detail::ipc_export x;
      x.boot_id = boot_id;
      x.pid = static_cast<std::uint32_t>(::getpid());
      std::uint32_t fd_index = 0;
      for (const auto& [base, a] : allocations) {
        x.allocations.push_back(a.wire);
        if (a.wire.kind == detail::ipc_handle_kind::vmm) x.allocations.back().fd_index = fd_index++;
      }
      x.table = table;
      return x;
    }

    // ---- what shardline::detail::serve_notices asks of its listener

    bool serving(const peer_state& p) const noexcept { return !p.gone && !closed; }

    bool notice_arrived(const std::shared_ptr<peer_state>& p, notice n) {
      if (notices.try_send(std::error_code{}, n)) return true;
      notices.async_send(std::error_code{}, n, [w = this->weak_from_this(), p](std::error_code ec) {
        auto s = w.lock();
        if (ec || !s || !s->serving(*p)) return;
        shardline::detail::acknowledge_notice(std::weak_ptr<receiver_state>(s), p);
      });
      return false;
    }

    void sender_left(const std::shared_ptr<peer_state>& p, std::error_code why) {
      if (p->gone) return;
      p->gone = true;
      std::error_code ignored;
      p->socket.close(ignored);
      if (auto it = peers.find(p->sender); it != peers.end() && it->second == p) peers.erase(it);
      if (!closed) notices.async_send(why, notice{p->sender, notice_kind::abort, 0}, [](std::error_code) {});
    }
  };

  struct accept_hooks {
    std::shared_ptr<receiver_state> receiver;
    std::shared_ptr<accept_state> accept;

    shardline::detail::judgement judge(const sender_identity& who) const {
      auto& s = *receiver;
      if (auto refusal = s.admitted.check(who)) return {refusal};
      if (auto it = s.peers.find(who.sender); it != s.peers.end()) {
        const std::error_code taken = make_error_code(errc::invalid_argument);
        switch (shardline::detail::probe_predecessor(it->second->socket.native_handle())) {
          case shardline::detail::predecessor::alive: return {taken};
          case shardline::detail::predecessor::leaving: return {taken, true};
          case shardline::detail::predecessor::gone:
            s.sender_left(it->second, make_error_code(errc::peer_disconnected));
        }
      }
      // Another handshake in progress may be admitting the same id.
      if (!s.handshakes->claim(&accept->socket, who.sender)) return {make_error_code(errc::invalid_argument)};
      return {};
    }

    // The header travels alone with the descriptors: a read that took part of the payload
    // with it would drop them.
    template <class Handler>
    void operator()(socket_type& socket, const sender_identity&, Handler&& handler) const {
      auto& s = *receiver;
      std::vector<int> fds;
      for (const auto& [base, a] : s.allocations)
        if (a.wire.kind == detail::ipc_handle_kind::vmm) fds.push_back(a.fd.get());
      std::string payload = detail::serialize(s.describe());
      const std::string header = detail::encode_header(static_cast<std::uint32_t>(fds.size()), payload.size());
      // A model in PyTorch's expandable segments has hundreds of allocations: past the kernel's
      // limit per message, the descriptors follow in messages of their own.
      const std::span<const int> all(fds);
      for (std::size_t at = 0; at == 0 || at < all.size(); at += detail::ipc_fds_per_message) {
        const auto group = all.subspan(at, std::min(detail::ipc_fds_per_message, all.size() - at));
        const std::string_view carrier = at == 0 ? std::string_view(header) : detail::ipc_fd_carrier;
        if (auto e = shardline::detail::send_with_fds(socket.native_handle(), std::as_bytes(std::span(carrier)), group))
          return std::forward<Handler>(handler)(e, std::size_t{0});
      }
      accept->payload = std::move(payload);
      asio::async_write(socket, asio::buffer(accept->payload), std::forward<Handler>(handler));
    }
  };

  // What shardline::detail::accept_peers asks of the transport (as the shm transport's).
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
      shardline::detail::async_handshake_accepted(std::shared_ptr<socket_type>(a, &a->socket), detail::ipc_magic,
                                                  s.options.connect_timeout, accept_hooks{receiver.lock(), a},
                                                  std::move(done));
    }
    std::error_code admit(receiver_state& s, const std::shared_ptr<accept_state>& a, std::error_code ec,
                          sender_identity who) const {
      if (s.closed) ec = asio::error::operation_aborted;
      if (!ec) {
        auto p = std::make_shared<peer_state>(std::move(a->socket), who.sender);
        s.peers[who.sender] = p;
        s.accepted = true;
        shardline::detail::serve_notices(std::weak_ptr<receiver_state>(s.shared_from_this()), std::move(p));
      }
      return detail::ipc_system_error(ec);
    }
  };

  struct accept_op {
    std::shared_ptr<receiver_state> receiver;
    std::error_code refused;

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
      shardline::detail::accept_peers(driver);
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

  // A write or a notice in the connection's queue. Writes start (their copies are enqueued on
  // the stream) as soon as no notice is ahead of them; a notice goes out once everything
  // ahead of it completed, and what follows it waits for its acknowledgement.
  struct queued_op : shardline::detail::erased_op<std::error_code> {
    using shardline::detail::erased_op<std::error_code>::erased_op;
    std::vector<detail::copy_piece> pieces;  // in batch order, each within one allocation
    std::error_code result;  // of a started write: its copies' outcome, or why it was cut off
    std::uint64_t id = 0;
    bool started = false, done = false, is_notice = false;
    shardline::detail::notice_frame frame{};

  protected:
    ~queued_op() = default;
  };
  using queued_ptr = shardline::detail::op_ptr<queued_op>;

  static void finish(queued_ptr op, std::error_code ec) { op.release()->complete(ec); }

  struct connection_state : std::enable_shared_from_this<connection_state> {
    connection_state(const Executor& ex, ipc_options o, socket_type s, sender_identity w)
        : executor(ex), options(o), control(std::move(s)), who(w) {}

    Executor executor;
    ipc_options options;
    shardline::detail::notice_link<socket_type, connection_state> control;
    sender_identity who;
    region_table table;
    std::vector<detail::ipc_allocation> allocations;    // the receiver's, ascending
    std::vector<detail::imported_allocation> imports;   // the same index: where each is mapped here
    // Declared after the imports: destroyed first (their work runs on regardless, which is
    // why started writes keep this state alive until they complete). The copies run on
    // `copies`; each write's completion is awaited on `completions`, which waits for `copied`
    // recorded after them: the stream callback that reports a write then stalls only that
    // stream, never the copies queued behind it.
    stream copies;
    stream completions;
    event copied;
    std::deque<queued_ptr> queue;
    link_status status = link_status::open;
    std::error_code failure;
    std::uint64_t next_id = 0;

    void notice_acknowledged(std::uint64_t id) {
      if (!queue.empty() && queue.front()->is_notice && queue.front()->id == id) {
        auto op = std::move(queue.front());
        queue.pop_front();
        finish(std::move(op), {});
        pump(this->shared_from_this());
      }
    }

    void control_ended(std::error_code why) { shut(this->shared_from_this(), link_status::failed, why); }

    // Validates the whole batch before any byte moves, then cuts it at allocation borders.
    std::error_code translate(std::span<const write_request> batch, queued_op& op) const {
      for (const auto& w : batch) {
        std::uint64_t address = w.remote_address, n = w.source.size();
        if (!table.covers(address, n)) return make_error_code(errc::region_not_exposed);
        const auto* source = w.source.data();
        while (n > 0) {
          const auto i = detail::allocation_at(allocations, address);
          if (i < 0) return make_error_code(errc::region_not_exposed);
          const auto& a = allocations[static_cast<std::size_t>(i)];
          const std::uint64_t k = std::min<std::uint64_t>(n, a.base + a.size - address);
          const std::uint64_t local = imports[static_cast<std::size_t>(i)].base() + (address - a.base);
          op.pieces.push_back({static_cast<std::uintptr_t>(local), reinterpret_cast<std::uintptr_t>(source),
                               static_cast<std::size_t>(k), static_cast<std::uint32_t>(i), w.source_key});
          address += k;
          source += k;
          n -= k;
        }
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
      slot.assign([w = std::weak_ptr<connection_state>(s), ex = s->executor, id = op->id](asio::cancellation_type) {
        asio::post(ex, [w, id] {
          if (auto s = w.lock()) cancel_queued(s, id);
        });
      });
    s->queue.push_back(std::move(op));
    pump(s);
  }

  // Enqueues the copies of `op`, then a wait for them on the io_context. The wait's handler
  // holds the connection state: mappings and sources stay until the GPU is done with them.
  static void start_write(const std::shared_ptr<connection_state>& s, queued_op& op) {
    op.started = true;
    // A column-split parameter comes as a piece per row: runs at constant strides go as one
    // 2-D copy each, when their source rows lie in one allocation.
    const auto one_source = [](const detail::planned_copy& c) {
      return detail::one_source_allocation(c.source, c.source_end() - 1);
    };
    for (const auto& c : detail::plan_copies(op.pieces, one_source)) {
      const cudaError_t e = detail::enqueue_copy(c, s->copies.native_handle());
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        op.result = make_error_code(e);
        break;
      }
    }
    cudaStream_t waited = s->completions.native_handle();
    if (cudaEventRecord(s->copied.native_handle(), s->copies.native_handle()) != cudaSuccess ||
        cudaStreamWaitEvent(waited, s->copied.native_handle(), 0) != cudaSuccess) {
      (void)cudaGetLastError();
      waited = s->copies.native_handle();  // correct, if slower: the callback stalls the copies
    }
    cuda::async_wait(s->executor, waited, [s, p = &op](std::error_code ec) {
      if (!p->result) p->result = ec;
      p->done = true;
      complete_done(s);
    });
  }

  static void complete_done(const std::shared_ptr<connection_state>& s) {
    while (!s->queue.empty() && !s->queue.front()->is_notice && s->queue.front()->done) {
      auto op = std::move(s->queue.front());
      s->queue.pop_front();
      const auto ec = op->result;
      finish(std::move(op), ec);
    }
    pump(s);
  }

  static void pump(const std::shared_ptr<connection_state>& s) {
    if (s->status != link_status::open) return;
    for (auto& op : s->queue) {
      if (op->is_notice) {
        if (&op == &s->queue.front() && !op->started) {
          op->started = true;
          s->control.send(op->frame, op->id);
        }
        return;
      }
      if (!op->started) start_write(s, *op);
    }
  }

  // Close or failure: what has not started, and a notice awaiting its ack, complete now;
  // started writes once their copies are done, with `reason`.
  static void shut(const std::shared_ptr<connection_state>& s, link_status why, std::error_code failure = {}) {
    const auto reason = why == link_status::closed ? std::error_code(asio::error::operation_aborted) : failure;
    if (s->status == link_status::open) {
      s->status = why;
      s->failure = failure;
    } else if (why == link_status::closed) {
      s->status = why;
    }
    s->control.close();
    std::vector<queued_ptr> ended;
    for (auto it = s->queue.begin(); it != s->queue.end();) {
      if (!(*it)->started || (*it)->is_notice) {
        ended.push_back(std::move(*it));
        it = s->queue.erase(it);
      } else {
        if (!(*it)->result) (*it)->result = reason;
        ++it;
      }
    }
    for (auto& op : ended) finish(std::move(op), reason);
  }

  static void cancel_queued(const std::shared_ptr<connection_state>& s, std::uint64_t id) {
    for (auto it = s->queue.begin(); it != s->queue.end(); ++it)
      if ((*it)->id == id) {
        if ((*it)->started && !(*it)->is_notice) return;  // its copies are on the GPU: it finishes
        auto op = std::move(*it);
        s->queue.erase(it);
        finish(std::move(op), asio::error::operation_aborted);
        pump(s);
        return;
      }
  }

public:
  using executor_type = Executor;

  /// Senders copy from device memory, or from page-locked host memory.
  static constexpr memory_kinds source_kinds{memory_kind::host_pinned, memory_kind::cuda_device};
  /// Receivers expose device memory.
  static constexpr memory_kinds destination_kinds{memory_kind::cuda_device};

  /// The sender side: connections map the receivers' memory into options.device's context
  /// and copy on streams of that device.
  explicit basic_ipc_transport(const executor_type& ex, ipc_options options = {}) : executor_(ex), options_(options) {}

  executor_type get_executor() const noexcept { return executor_; }
  const ipc_options& options() const noexcept { return options_; }

  /// Copies read the sender's memory in place: nothing to register.
  using registration = unregistered_memory;

  /// Records `bytes` as staging memory at `where`, after checking that CUDA sees it so:
  /// throws shardline::error(errc::unsupported_memory) for a kind outside source_kinds, or
  /// memory that is not what `where` says (pageable memory said to be pinned, host memory
  /// said to be on a device, memory of another device).
  registration register_memory(std::span<std::byte> bytes, memory_location where = {}) {
    require_kind(source_kinds, where, "the cuda ipc transport", "staging memory");
    if (!bytes.empty()) {
      if (auto why = check_memory(bytes.data(), where); !why.empty())
        throw error(make_error_code(errc::unsupported_memory), "cuda ipc transport: staging memory " + why);
    }
    return registration{bytes, where};
  }

  /// The rollout side: exports the device memory it exposes and listens on a Unix socket for
  /// its senders until close(). Move-only; closes on destruction.
  class receiver {
  public:
    /// Listens at `socket_path` (a stale socket file there is removed). Throws
    /// shardline::error naming the path and the cause.
    receiver(const executor_type& ex, std::string socket_path, ipc_options options = {})
        : state_(std::make_shared<receiver_state>(ex, std::move(socket_path), options)) {
      auto& s = *state_;
      if (auto ec = path_error(s.path))
        throw error(ec, "cuda ipc receiver: socket path '" + s.path + "' must be 1 to " +
                            std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) + " bytes");
      struct stat st {};
      if (::lstat(s.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(s.path.c_str());
      std::error_code ec;
      auto check = [&](const char* what) {
        ec = detail::ipc_system_error(ec);
        if (ec) throw error(ec, "cuda ipc receiver: cannot " + std::string(what) + " socket '" + s.path + "': " + ec.message());
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

    executor_type get_executor() const noexcept { return state_->executor; }

    /// A zeroed arena of `bytes` on options.device (cudaMalloc), owned by this receiver.
    /// Expose ranges of it; each arena is exported once. Throws shardline::error:
    /// errc::invalid_argument for 0 bytes or once a sender has connected; the CUDA error of
    /// cudaMalloc or cudaMemset.
    std::span<std::byte> allocate(std::size_t bytes) {
      auto& s = *state_;
      const auto where = "cuda ipc receiver '" + s.path + "': arena of " + std::to_string(bytes) + " bytes: ";
      if (bytes == 0) throw error(make_error_code(errc::invalid_argument), where + "an arena cannot be empty");
      if (s.accepted) throw error(make_error_code(errc::invalid_argument), where + "allocated after a sender connected");
      device_buffer b(bytes, s.options.device);
      throw_if(cudaMemset(b.data(), 0, bytes), where + "cudaMemset");
      auto span = b.bytes();
      s.arenas.push_back(std::move(b));
      return span;
    }

    /// Names `e.bytes` (device memory of device e.location.device: an arena of this
    /// receiver, or the engine's own tensor) in the region table the senders receive, and
    /// exports the allocation(s) holding it, each once. Throws shardline::error naming the
    /// region: errc::unsupported_memory for a location outside destination_kinds, or bytes
    /// that are not device memory of that device; errc::invalid_argument for a name given
    /// twice, an overlap, or once a sender has connected; the CUDA (or CUDA driver) error of
    /// an export that failed (memory of cudaMallocAsync pools cannot be exported, nor VMM
    /// memory created without CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR).
    void expose(exposure e) {
      auto& s = *state_;
      static constexpr shardline::detail::exposer who{"cuda ipc receiver", "the cuda ipc transport",
                                                       destination_kinds};
      shardline::detail::expose_region(s.table, std::move(e), who, [&](const exposure& x) {
        if (s.accepted)
          throw error(make_error_code(errc::invalid_argument), who.region(x.name) + " exposed after a sender connected");
        if (x.bytes.empty()) return 0u;
        if (auto why = check_memory(x.bytes.data(), x.location); !why.empty())
          throw error(make_error_code(errc::unsupported_memory), who.region(x.name) + " " + why);
        export_range(s, who.region(x.name), x.bytes, x.location.device);
        return 0u;  // unused: senders translate writes by address, through the allocations
      });
    }

    void expose(std::string name, std::span<std::byte> bytes) {
      expose({std::move(name), bytes, memory_location::cuda(state_->options.device), {}});
    }

    void admit(admission a) noexcept { state_->admitted = a; }

    /// Addresses are this process's device addresses.
    const region_table& regions() const noexcept { return state_->table; }

    /// How many allocations the exposed regions live in (each exported once), and how many
    /// of them travel as VMM shareable handles.
    std::size_t exported_allocations() const noexcept { return state_->allocations.size(); }
    std::size_t exported_vmm_allocations() const noexcept {
      return static_cast<std::size_t>(std::count_if(state_->allocations.begin(), state_->allocations.end(), [](const auto& a) {
        return a.second.wire.kind == detail::ipc_handle_kind::vmm;
      }));
    }

    /// Accepts one sender: completion void(std::error_code, std::uint32_t sender), with the
    /// errors and cancellation of the shm transport's async_accept: the handshake of
    /// transport/detail/handshake.hpp, then the header with the VMM descriptors and the
    /// payload (ipc_wire.hpp). Call again for each further sender.
    template <class Token>
    auto async_accept(Token&& token) {
      return asio::async_compose<Token, void(std::error_code, std::uint32_t)>(accept_op{state_, {}}, token,
                                                                             state_->executor);
    }

    /// Completion void(std::error_code, notice): each notice of each sender, in that
    /// sender's order, every one after the copies its sender completed before sending it.
    /// When a sender leaves: errc::peer_disconnected with notice {sender, abort, 0}. After
    /// close(): errc::not_connected (a pending wait: channel_cancelled).
    template <class Token>
    auto async_wait_notification(Token&& token) {
      return asio::async_initiate<Token, void(std::error_code, notice)>(
          [s = state_](auto handler) {
            if (s->closed)
              return shardline::detail::post_completion(s->executor, std::move(handler),
                                                        make_error_code(errc::not_connected), notice{});
            s->notices.async_receive(std::move(handler));
          },
          token);
    }

    /// Stops listening, ends a pending accept, closes every sender's socket and removes the
    /// socket file. Arenas and exported descriptors stay until destruction (a sender that
    /// mapped them keeps its own mapping). Never throws.
    void close() noexcept {
      if (!state_ || state_->closed) return;
      auto& s = *state_;
      s.closed = true;
      std::error_code ignored;
      s.acceptor.close(ignored);
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
    // Exports every allocation under `bytes` not exported yet (a tensor may span several
    // chunks of an expandable segment); one export per allocation, however many tensors.
    static void export_range(receiver_state& s, const std::string& region, std::span<std::byte> bytes, int device) {
      const auto& d = detail::driver();
      if (!d.available) throw error(detail::driver_missing(), region + ": the CUDA driver API is not available");
      detail::context_scope scope(device);
      throw_if(scope.error(), region + ": device " + std::to_string(device));
      std::uint64_t address = reinterpret_cast<std::uintptr_t>(bytes.data());
      const std::uint64_t end = address + bytes.size();
      while (address < end) {
        auto it = s.allocations.upper_bound(address);
        if (it == s.allocations.begin() || !std::prev(it)->second.wire.contains(address)) {
          auto made = export_allocation(region, address, device);
          const auto base = made.wire.base;
          it = s.allocations.emplace(base, std::move(made)).first;
        } else {
          --it;
        }
        address = it->second.wire.base + it->second.wire.size;
      }
    }

    static exported_allocation export_allocation(const std::string& region, std::uint64_t address, int device) {
      const auto& d = detail::driver();
      CUdeviceptr base = 0;
      std::size_t size = 0;
      if (auto r = d.get_address_range(&base, &size, static_cast<CUdeviceptr>(address)); r != CUDA_SUCCESS)
        throw error(detail::make_driver_error(r), region + ": cuMemGetAddressRange");
      exported_allocation out;
      out.wire.device = device;
      out.wire.base = base;
      out.wire.size = size;
      throw_if(detail::uuid_of(device, out.wire.uuid), region + ": the UUID of device " + std::to_string(device));
      CUmemGenericAllocationHandle h = 0;
      const bool vmm = d.retain_allocation_handle(&h, reinterpret_cast<void*>(static_cast<std::uintptr_t>(address))) ==
                       CUDA_SUCCESS;
      unsigned long long types = 0;
      if (vmm) {
        CUmemAllocationProp prop{};
        if (d.allocation_properties(&prop, h) == CUDA_SUCCESS) types = prop.requestedHandleTypes;
      }
      if (detail::choose_export(vmm, types) == detail::export_path::vmm) {
        int fd = -1;
        const CUresult r = d.export_to_shareable_handle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        (void)d.release(h);  // the retain's reference; the allocation lives on in its mappings
        if (r != CUDA_SUCCESS) throw error(detail::make_driver_error(r), region + ": cuMemExportToShareableHandle");
        out.wire.kind = detail::ipc_handle_kind::vmm;
        out.fd = shardline::detail::unique_fd(fd);
      } else {
        if (vmm) (void)d.release(h);
        cudaIpcMemHandle_t ih{};
        const cudaError_t e = cudaIpcGetMemHandle(&ih, reinterpret_cast<void*>(static_cast<std::uintptr_t>(base)));
        throw_if(e, region + ": cudaIpcGetMemHandle of the allocation holding it" +
                        std::string(vmm ? " (VMM memory created without CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, "
                                          "which only a legacy handle could share)"
                                        : ""));
        out.wire.kind = detail::ipc_handle_kind::legacy;
        std::memcpy(out.wire.legacy.data(), &ih, sizeof ih);
      }
      return out;
    }

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

    /// The receiver's regions; addresses are the receiver's device addresses.
    const region_table& remote_regions() const noexcept {
      static const region_table none;
      return state_ ? state_->table : none;
    }

    sender_identity identity() const noexcept { return state_ ? state_->who : sender_identity{}; }

    bool is_open() const noexcept { return state_ && state_->status == link_status::open; }

    /// Completion void(std::error_code), once every request landed: the copies
    /// (cudaMemcpyAsync on this connection's stream; one cudaMemcpy2DAsync for each run of
    /// requests of equal length at constant strides, such as a column split's rows) are done,
    /// awaited with cuda::async_wait on the io_context. The whole batch is validated first: a
    /// request outside every exposed region fails it with errc::region_not_exposed before any
    /// byte moves, and the connection stays usable. Writes start at once unless a notice is
    /// ahead of them, so several batches are in flight together; they complete in initiation
    /// order. A CUDA error of the copies completes the write with it (cuda::error_category()).
    /// Per-operation cancellation (any type): a batch waiting behind a notice completes with
    /// operation_aborted and the connection stays usable; one whose copies are enqueued
    /// finishes. The receiver gone: errc::peer_disconnected (copies enqueued still ran);
    /// close(): operation_aborted; later operations errc::not_connected after close(), the
    /// failure's code after a failure.
    template <class Token>
    auto async_write(std::span<const write_request> batch, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [ex = executor_, s = state_](auto handler, std::span<const write_request> batch) {
            if (auto ec = unusable(s)) return shardline::detail::post_completion(ex, std::move(handler), ec);
            auto slot = asio::get_associated_cancellation_slot(handler);
            auto op = shardline::detail::make_op<queued_op>(std::move(handler), ex);
            if (auto ec = s->translate(batch, *op)) return finish(std::move(op), ec);
            enqueue(s, std::move(op), slot);
          },
          token, batch);
    }

    /// Delivers notice {identity().sender, kind, version} once every earlier write of this
    /// connection completed (its copies are done: a commit reaches the receiver only after
    /// every byte before it landed), and holds later writes until the receiver acknowledged
    /// it. Completion void(std::error_code) on that acknowledgement; errors and cancellation
    /// as the shm transport's async_notify.
    template <class Token>
    auto async_notify(notice_kind kind, std::uint32_t version, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [ex = executor_, s = state_](auto handler, notice_kind kind, std::uint32_t version) {
            if (auto ec = unusable(s)) return shardline::detail::post_completion(ex, std::move(handler), ec);
            auto slot = asio::get_associated_cancellation_slot(handler);
            auto op = shardline::detail::make_op<queued_op>(std::move(handler), ex);
            op->is_notice = true;
            op->frame = shardline::detail::encode_notice(kind, version);
            enqueue(s, std::move(op), slot);
          },
          token, kind, version);
    }

    /// Waiting operations and a notice awaiting its acknowledgement complete with
    /// operation_aborted now, a write whose copies are enqueued once they are done; the
    /// receiver sees this sender leave. The mappings go when the last copy is done. Never
    /// throws.
    void close() noexcept {
      if (state_ && state_->status != link_status::closed) shut(state_, link_status::closed);
    }

  private:
    friend class basic_ipc_transport;
    connection(const Executor& ex, std::shared_ptr<connection_state> s) : executor_(ex), state_(std::move(s)) {}

    Executor executor_;
    std::shared_ptr<connection_state> state_;
  };

  /// Connects as sender `who` to the receiver listening at `socket_path`: says hello, gets
  /// the verdict and, when admitted, the receiver's export, and maps every allocation into
  /// options.device's context once (or, in the receiver's own process, uses its pointers).
  /// Completion void(std::error_code, connection). Errors: those of the shm transport's
  /// async_connect (refusals, socket errors, timed_out, peer_disconnected, protocol_error,
  /// protocol_version_mismatch, invalid_argument for a bad path); ipc_errc::foreign_host for
  /// an export made on another host or boot; ipc_errc::device_unreachable for memory on a GPU
  /// this process does not see or cannot reach from options.device; the CUDA (or CUDA
  /// driver) error of an import. Cancellable (any type): operation_aborted.
  template <class Token>
  auto async_connect(std::string socket_path, sender_identity who, Token&& token) {
    return asio::async_compose<Token, void(std::error_code, connection)>(
        connect_op{std::make_shared<connect_state>(executor_, options_, std::move(socket_path), who), {}}, token,
        executor_);
  }

  template <class Token>
  auto async_connect(std::string socket_path, Token&& token) {
    return async_connect(std::move(socket_path), sender_identity{}, std::forward<Token>(token));
  }

  /// Maps what `x` describes for a sender on `device` (`fds`: the descriptors of its VMM
  /// allocations). Blocking driver calls; on failure `ec` says why.
  static std::vector<detail::imported_allocation> import_all(const detail::ipc_export& x,
                                                             std::span<const shardline::detail::unique_fd> fds,
                                                             int device, std::error_code& ec) {
    std::vector<detail::imported_allocation> out;
    const auto origin = detail::origin_of(x, detail::this_boot_id(), static_cast<std::uint32_t>(::getpid()));
    if (origin == detail::ipc_origin::foreign) {
      ec = make_error_code(ipc_errc::foreign_host);
      return {};
    }
    for (const auto& a : x.allocations) {
      if (origin == detail::ipc_origin::same_process) {
        out.push_back(detail::imported_allocation::in_place(a.base, a.size));
        continue;
      }
      const int target = detail::ordinal_of(a.uuid);
      int peer = 0;
      if (target >= 0 && target != device && cudaDeviceCanAccessPeer(&peer, device, target) != cudaSuccess) {
        (void)cudaGetLastError();
        peer = 0;
      }
      if (!detail::reachable(device, target, peer != 0)) {
        ec = make_error_code(ipc_errc::device_unreachable);
        return {};
      }
      auto imported = a.kind == detail::ipc_handle_kind::legacy
                          ? detail::imported_allocation::open_legacy(a, device, ec)
                          : detail::imported_allocation::import_vmm(a, fds[a.fd_index].get(), device, ec);
      if (ec) return {};
      out.push_back(std::move(imported));
    }
    ec.clear();
    return out;
  }

private:
  // Why CUDA does not see `p` as memory at `where` ("is host memory, not cuda_device:0"),
  // empty when it does.
  static std::string check_memory(const void* p, const memory_location& where) {
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return "cannot be checked: cudaPointerGetAttributes: " + std::string(cudaGetErrorString(e));
    }
    std::string seen;
    switch (a.type) {
      case cudaMemoryTypeUnregistered: seen = "pageable host memory (neither pinned nor device memory)"; break;
      case cudaMemoryTypeHost: seen = "host_pinned"; break;
      case cudaMemoryTypeDevice: seen = to_string(memory_location::cuda(a.device)); break;
      case cudaMemoryTypeManaged: seen = "managed memory"; break;
    }
    if (seen == to_string(where)) return {};
    return "is " + seen + ", not " + to_string(where) + " as declared";
  }

  struct connect_state {
    connect_state(const Executor& ex, ipc_options o, std::string p, sender_identity w)
        : executor(ex), options(o), path(std::move(p)), who(w), socket(ex) {}
    Executor executor;
    ipc_options options;
    std::string path;
    sender_identity who;
    socket_type socket;
    std::array<std::byte, detail::ipc_header_bytes> header{};
    std::size_t header_got = 0;
    std::array<std::byte, 4> carrier{};
    std::size_t carrier_got = 0;
    std::size_t fds_expected = 0;
    std::uint64_t payload_bytes = 0;
    std::vector<shardline::detail::unique_fd> fds;
    std::vector<std::byte> payload;
    detail::ipc_export exported;
    std::vector<detail::imported_allocation> imports;
  };

  // What the IPC sender adds to the shared handshake once admitted: the header with the VMM
  // descriptors (read with recvmsg when readable), the payload, then the imports.
  struct receive_export {
    std::shared_ptr<connect_state> c;
    enum class step { wait, header, carrier, payload } at = step::wait;

    // Reads what is left of `into` (the header, or a carrier) and the descriptors attached;
    // false when it must wait for more, having completed `self` on an error.
    template <class Self>
    bool read_with_fds(Self& self, std::span<std::byte> into, std::size_t& got) {
      bool truncated = false;
      std::error_code e;
      const std::size_t n =
          shardline::detail::receive_with_fds(c->socket.native_handle(), into.subspan(got), c->fds, truncated, e);
      if (e && e != std::errc::resource_unavailable_try_again && e != std::errc::operation_would_block) {
        self.complete(e);
        return false;
      }
      if (!e && n == 0) {
        self.complete(make_error_code(errc::peer_disconnected));
        return false;
      }
      if (truncated || c->fds.size() > c->fds_expected) {
        self.complete(make_error_code(errc::protocol_error));
        return false;
      }
      got += n;
      if (got < into.size()) {
        c->socket.async_wait(asio::socket_base::wait_read, std::move(self));
        return false;
      }
      return true;
    }

    template <class Self>
    void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
      if (ec) return self.complete(ec);
      switch (at) {
        case step::wait:
          at = step::header;
          c->fds_expected = detail::ipc_fds_per_message;
          return c->socket.async_wait(asio::socket_base::wait_read, std::move(self));
        case step::header: {
          if (!read_with_fds(self, c->header, c->header_got)) return;
          std::uint32_t fds = 0;
          if (auto bad = detail::decode_header(c->header.data(), c->fds.size(), fds, c->payload_bytes))
            return self.complete(bad);
          c->fds_expected = fds;
          at = step::carrier;
          return (*this)(self);
        }
        case step::carrier:
          if (c->fds.size() < c->fds_expected) {
            if (c->carrier_got == c->carrier.size()) c->carrier_got = 0;  // the last one was whole
            if (!read_with_fds(self, c->carrier, c->carrier_got)) return;
            if (std::memcmp(c->carrier.data(), detail::ipc_fd_carrier.data(), 4) != 0)
              return self.complete(make_error_code(errc::protocol_error));
            return (*this)(self);
          }
          c->payload.resize(static_cast<std::size_t>(c->payload_bytes));
          at = step::payload;
          return asio::async_read(c->socket, asio::buffer(c->payload), std::move(self));
        case step::payload: {
          std::error_code e;
          std::string why;
          c->exported = detail::parse_export(
              std::string_view(reinterpret_cast<const char*>(c->payload.data()), c->payload.size()), c->fds.size(), e,
              why);
          if (!e) c->imports = import_all(c->exported, c->fds, c->options.device, e);
          return self.complete(e);
        }
      }
    }
  };

  struct connect_exchange {
    std::shared_ptr<connect_state> c;
    template <class Handler>
    void operator()(socket_type&, Handler&& handler) const {
      asio::async_compose<std::decay_t<Handler>, void(std::error_code)>(receive_export{c}, handler, c->executor);
    }
  };

  struct connect_op {
    std::shared_ptr<connect_state> c;
    std::error_code refused;

    template <class Self>
    void operator()(Self& self) {
      if (refused) return self.complete(refused, connection(c->executor, nullptr));
      if ((refused = path_error(c->path))) return asio::post(c->executor, std::move(self));
      self.reset_cancellation_state(asio::enable_total_cancellation());
      shardline::detail::async_handshake_as_sender(std::shared_ptr<socket_type>(c, &c->socket),
                                                   asio::local::stream_protocol::endpoint(c->path), detail::ipc_magic,
                                                   c->who, c->options.connect_timeout, connect_exchange{c},
                                                   std::move(self));
    }

    template <class Self>
    void operator()(Self& self, std::error_code ec) {
      std::shared_ptr<connection_state> s;
      if (!ec) {
        try {
          s = std::make_shared<connection_state>(c->executor, c->options, std::move(c->socket), c->who);
          s->copies = stream(c->options.device);
          s->completions = stream(c->options.device);
          s->copied = event(c->options.device);
        } catch (const std::system_error& e) {
          ec = e.code();
        }
      }
      if (ec) return self.complete(detail::ipc_system_error(ec), connection(c->executor, nullptr));
      s->table = std::move(c->exported.table);
      s->allocations = std::move(c->exported.allocations);
      s->imports = std::move(c->imports);
      s->control.watch(s);
      self.complete(std::error_code{}, connection(c->executor, std::move(s)));
    }
  };

  executor_type executor_;
  ipc_options options_;
};

using ipc_transport = basic_ipc_transport<>;

static_assert(transport<ipc_transport>);

}  // namespace shardline::cuda
