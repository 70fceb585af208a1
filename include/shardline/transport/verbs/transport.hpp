// shardline/transport/verbs/transport.hpp: RDMA WRITE over libibverbs RC queue pairs, with the CQs
// polled by the io_context and a TCP control connection per sender for admission, the QP
// exchange, the region table and the notices. Satisfies shardline::transport.
#pragma once

#include <shardline/detail/completion.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/detail/handshake.hpp>
#include <shardline/transport/verbs/completion_queue.hpp>
#include <shardline/transport/verbs/detail/connection_state.hpp>
#include <shardline/transport/verbs/detail/receiver_state.hpp>
#include <shardline/transport/verbs/detail/wire.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/error.hpp>
#include <shardline/transport/verbs/memory_region.hpp>
#include <shardline/transport/verbs/memory_window.hpp>
#include <shardline/transport/verbs/options.hpp>
#include <shardline/transport/verbs/queue_pair.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>

#include <array>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>

namespace shardline::verbs {

/// The verbs transport: one device (context + PD) per transport object.
///
/// Sender: register_memory() once per staging arena (local access only), async_connect()
/// to a receiver's control endpoint as a sender_identity, then connection::async_write and
/// connection::async_notify (begin / commit / abort of a version).
/// Receiver: allocate() arenas (registered once with remote write) or adopt memory it
/// already owns, expose() named regions, admit() whom it accepts, async_accept() each
/// sender, async_wait_notification() for their notices.
///
/// The control connection (TCP) carries, in order: the sender's hello
/// (shardline::detail::encode_hello("SLVB", identity)); the proof, each way, that both
/// hold options::key (transport/detail/psk_auth.hpp; a peer that does not prove it gets a
/// challenge and a failed status, nothing else); the receiver's verdict (admitted, or the
/// errc of the refusal, after which it closes that socket); only once admitted, the QP
/// exchange and the region table (detail/wire.hpp); then notice frames, each acknowledged
/// by its echo. Its end is how each side learns that the other left.
///
/// Thread safety: distinct objects safe; shared objects unsafe. Every object of one
/// transport is used from the executor's thread (an io_context run by one thread, or a
/// strand). No threads of its own: completions run as handlers on the executor.
template <poll_mode Mode = poll_mode::adaptive, class Executor = asio::any_io_executor>
class basic_verbs_transport {
public:
  using executor_type = Executor;
  static constexpr poll_mode mode = Mode;
  /// RDMA WRITE reads and writes registered host memory of either kind; cuda_device memory
  /// only through options::register_device_memory (dma-buf), checked at run time:
  /// readable_kinds(), receiver::exposable_kinds().
  static constexpr memory_kinds source_kinds{memory_kind::host, memory_kind::host_pinned};
  static constexpr memory_kinds destination_kinds{memory_kind::host, memory_kind::host_pinned};
  /// What a sender writes in a receiver's table: any kind the receiver could register,
  /// cuda_device included where its options::register_device_memory is set (dma-buf).
  static constexpr memory_kinds exposed_kinds{memory_kind::host, memory_kind::host_pinned, memory_kind::cuda_device};

  /// Opens the device. Throws shardline::error: errc::invalid_argument, before touching
  /// the device, when `opts` has no key and does not set allow_unauthenticated;
  /// errc::no_device ("no RDMA device: ...") when there is none (or the named one is
  /// missing, or has no active port / RoCE v2 IPv4 GID). Unauthenticated, it writes one
  /// warning to stderr.
  explicit basic_verbs_transport(const executor_type& ex, options opts = {})
      : executor_(ex),
        opts_(require_key_choice(std::move(opts))),
        device_(std::make_shared<device>(opts_.device, opts_.port, opts_.gid_index)) {
    if (opts_.memory_windows == memory_window_use::required && !device_->supports_memory_windows())
      throw error(make_error_code(errc::no_device),
                  "no RDMA device: " + device_->name() + " has no type 2 memory windows (max_mw " +
                      std::to_string(device_->attr().max_mw) +
                      ", no MEM_WINDOW_TYPE_2A/2B) and options::memory_windows is required");
    if (!opts_.key)
      std::fprintf(stderr,
                   "shardline: warning: verbs transport on %s runs unauthenticated "
                   "(options::allow_unauthenticated): anyone who reaches its control port can write the "
                   "weights; set options::key\n",
                   device_->name().c_str());
  }

  executor_type get_executor() const noexcept { return executor_; }
  const options& get_options() const noexcept { return opts_; }
  const device& get_device() const noexcept { return *device_; }
  /// The device, shared: building blocks made on it (memory_region, queue_pair) share this
  /// transport's protection domain and keep the device alive.
  std::shared_ptr<device> shared_device() const noexcept { return device_; }

  /// The sender's staging memory, registered once (local access only). Move-only RAII.
  class registration {
  public:
    registration() = default;
    local_region region() const noexcept {
      local_region r = mr_.region();
      r.location = where_;
      return r;
    }

  private:
    friend class basic_verbs_transport;
    registration(memory_region mr, memory_location where) : mr_(std::move(mr)), where_(where) {}
    memory_region mr_;
    memory_location where_{};
  };

  /// Registers exactly `bytes`, which live at `where` (cuda_device memory through
  /// options::register_device_memory). Throws shardline::error: errc::unsupported_memory for
  /// a kind outside readable_kinds(), the errno of ibv_reg_mr (or what the hook throws) when
  /// it fails.
  registration register_memory(std::span<std::byte> bytes, memory_location where = {}) {
    require_kind(readable_kinds(), where, "the verbs transport", "staging memory");
    if (where.kind == memory_kind::cuda_device) return registration(opts_.register_device_memory(device_, bytes, where, 0), where);
    return registration(memory_region(device_, bytes, 0), where);
  }

  /// What register_memory() takes here: source_kinds, and cuda_device where
  /// options::register_device_memory is set (dma-buf, shardline/cuda/gpudirect.hpp).
  memory_kinds readable_kinds() const noexcept { return with_device_memory(source_kinds, opts_); }

  /// A sender's connection to one receiver: `queue_pairs` RC QPs sharing one CQ, and the
  /// TCP control connection. Satisfies shardline::transport_connection. Move-only;
  /// destroying it closes it.
  class connection {
  public:
    using executor_type = Executor;
    using state_type = detail::connection_state<Mode, Executor>;

    connection() = default;
    connection(connection&&) noexcept = default;
    connection& operator=(connection&& o) noexcept {
      if (this != &o) {
        close();
        state_ = std::move(o.state_);
        executor_ = std::move(o.executor_);
      }
      return *this;
    }
    ~connection() { close(); }

    /// Precondition: not default-constructed (that one has no executor).
    executor_type get_executor() const noexcept { return *executor_; }

    const region_table& remote_regions() const noexcept {
      static const region_table empty;
      return state_ ? state_->table : empty;
    }

    /// Who this sender said it is when connecting.
    sender_identity identity() const noexcept { return state_ ? state_->identity() : sender_identity{}; }

    /// Whether the receiver gave this connection memory-window rkeys (options::memory_windows).
    bool memory_windows() const noexcept { return state_ && state_->memory_windows(); }

    /// The rkey that a write under `key` (a remote_regions() key) carries on QP `qp`: with
    /// memory windows, that of the window the receiver bound to its QP `qp` for this
    /// connection alone (the table's keys are then registration numbers, which no QP
    /// accepts); without, `key` itself. A key the receiver did not give goes out unchanged
    /// (and fails with a remote access error).
    std::uint32_t rkey(std::uint32_t key, std::size_t qp) const noexcept {
      return state_ ? state_->rkey(key, qp) : key;
    }

    /// False once closed, once the control connection ended (the receiver left or sent
    /// garbage; the control socket is read for the connection's whole life, so an idle
    /// sender learns it too, and an open connection keeps its io_context's run() busy), or
    /// once a work completion failed (the QPs went to the error state). A cancelled or
    /// refused (region_not_exposed) write never makes it false. Such a connection is never reused: later
    /// writes fail at once with errc::connection_failed (or not_connected,
    /// peer_disconnected); connect again instead.
    bool is_open() const noexcept { return state_ && state_->is_open(); }

    /// Writes every request of `batch` (each one split at the port's max message size,
    /// striped over the QPs, posted in chains of at most max_wr_per_post, never more WRs
    /// than the QPs and the CQ can hold: the rest waits). Completion signature
    /// void(std::error_code): success once every WR completed. A request outside the
    /// receiver's table (remote_regions().covers()) fails the batch whole with
    /// errc::region_not_exposed before anything is posted; the connection goes on. A failed
    /// work completion gives std::error_code(wc.status, wc_category()) (message:
    /// ibv_wc_status_str) and fails the connection (its QPs go to ERR; every other
    /// outstanding write fails too). The span is read during initiation; the source bytes
    /// must stay untouched until completion.
    /// Cancellation: WRs already posted cannot be recalled. Terminal or partial, while some
    /// of the batch's WRs wait to be posted (back-pressure): the write posts none of them,
    /// waits for the posted ones to complete, then completes with operation_aborted (the
    /// posted part has landed). Total: only while none is posted (nothing moved). A write
    /// whose WRs are all posted completes as it lands, cancelled or not. Either way the QPs
    /// stay in RTS: other writes go on, and the next write works.
    template <class Token>
    auto async_write(std::span<const write_request> batch, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(initiate_write{this}, token,
                                                                batch);
    }

    /// Sends notice {identity().sender, kind, version} on the control connection once every
    /// write of this connection initiated before this call has completed (successfully or
    /// not), and completes with void(std::error_code) when the receiver's acknowledgement
    /// arrives: success means the receiving process holds the notice. Notices are delivered
    /// in the order they were initiated. Still works after a failed work completion (so
    /// that an abort can be announced); errc::peer_disconnected when the control connection
    /// ends first, errc::protocol_error for a garbage acknowledgement, errc::not_connected
    /// after close().
    /// Cancellation (any type): a notice not sent yet is withdrawn, one already sent may
    /// still be delivered; either way it completes with operation_aborted at once.
    template <class Token>
    auto async_notify(notice_kind kind, std::uint32_t version, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(initiate_notify{this}, token,
                                                                kind, version);
    }

    /// Moves the QPs to ERR and closes the control connection (the receiver sees this
    /// sender leave): pending writes and notices complete with operation_aborted, later
    /// ones with not_connected. Never throws.
    void close() noexcept {
      if (state_) state_->close();
    }

  private:
    friend class basic_verbs_transport;
    connection(const Executor& ex, std::shared_ptr<state_type> s)
        : state_(std::move(s)), executor_(ex) {}

    template <class Handler>
    static void not_connected(Handler&& handler) {
      auto ex = asio::get_associated_executor(handler);
      shardline::detail::post_completion(ex, std::forward<Handler>(handler), make_error_code(errc::not_connected));
    }

    struct initiate_write {
      connection* self;
      template <class Handler>
      void operator()(Handler&& handler, std::span<const write_request> batch) const {
        if (!self->state_) return not_connected(std::forward<Handler>(handler));
        self->state_->start_write(batch, std::forward<Handler>(handler));
      }
    };

    struct initiate_notify {
      connection* self;
      template <class Handler>
      void operator()(Handler&& handler, notice_kind kind, std::uint32_t version) const {
        if (!self->state_) return not_connected(std::forward<Handler>(handler));
        self->state_->start_notify(kind, version, std::forward<Handler>(handler));
      }
    };

    std::shared_ptr<state_type> state_;
    std::optional<Executor> executor_;
  };

  /// The receiving side: listens for senders on a TCP control endpoint.
  /// Satisfies shardline::transport_receiver. Not movable (operations refer to it).
  class receiver {
  public:
    using executor_type = Executor;
    using state_type = detail::receiver_state<Mode, Executor>;
    static constexpr memory_kinds destination_kinds = basic_verbs_transport::destination_kinds;

    /// Binds and listens on `listen` (port 0: ephemeral). `notice_depth` bounds the notices
    /// queued before async_wait_notification takes them: a notice is acknowledged once it is
    /// taken or queued within that depth; past it, its sender's async_notify waits, and its
    /// next notice is not read, until a wait takes one (0: every notice waits for a wait).
    /// Throws std::system_error when the address cannot be bound.
    receiver(basic_verbs_transport& t, asio::ip::tcp::endpoint listen, std::size_t notice_depth = 64)
        : transport_(&t),
          state_(std::make_shared<state_type>(t.executor_, t.device_, t.opts_, listen,
                                              notice_depth)) {}
    receiver(const receiver&) = delete;
    receiver& operator=(const receiver&) = delete;
    ~receiver() { close(); }

    executor_type get_executor() const noexcept { return transport_->executor_; }
    asio::ip::tcp::endpoint local_endpoint() const {
      return state_->acceptor().local_endpoint();
    }

    /// An mmap'd arena of exactly `bytes`, registered once with local + remote write.
    /// Throws shardline::error on failure.
    std::span<std::byte> allocate(std::size_t bytes) { return state_->allocate(bytes); }

    /// Names `e.bytes` in the region table, with its location and layout. A range inside
    /// an allocate()d arena gets the arena's rkey. Any other range (memory the caller owns,
    /// e.g. an inference engine's tensors) is registered on its own over exactly those
    /// bytes, with local and remote write only (never remote read); the receiver keeps that
    /// registration, and the caller keeps the bytes valid, until the receiver is destroyed.
    /// cuda_device memory is registered through options::register_device_memory (dma-buf).
    /// Throws shardline::error naming the region: errc::unsupported_memory for a kind
    /// outside exposable_kinds(), errc::invalid_argument for a name given twice or an
    /// overlap, ibv_reg_mr's errno (with its text) when the registration fails. Expose
    /// before accepting: each sender receives the table when it connects.
    void expose(exposure e) { state_->expose(std::move(e), exposable_kinds()); }
    /// What expose() takes here: destination_kinds, and cuda_device where
    /// options::register_device_memory is set (registered through it).
    memory_kinds exposable_kinds() const noexcept { return with_device_memory(destination_kinds, state_->opts()); }
    /// A host byte region.
    void expose(std::string name, std::span<std::byte> bytes) {
      expose(exposure{std::move(name), bytes, {}, {}});
    }

    /// Whom async_accept admits from now on (default: anyone).
    void admit(admission a) noexcept { state_->admit(a); }

    /// Whether each sender gets rkeys of its own, memory windows bound to the receiver's QPs
    /// connected to it and revoked when it leaves (options::memory_windows, and the device).
    /// Then regions().key is a registration number, not an rkey, and memory is registered
    /// with local write and MW bind only; otherwise it is the memory region's rkey.
    bool memory_windows() const noexcept { return state_->memory_windows(); }

    const region_table& regions() const noexcept { return state_->table(); }

    /// Accepts one sender: reads its hello; with options::key, challenges it to prove the
    /// key and drops it with errc::authentication_failed (a failed status, then the end of
    /// the connection: no verdict, QP or region table) when it does not; refuses it (verdict,
    /// then closes that socket) for another protocol version (errc::protocol_version_mismatch), garbage
    /// (errc::protocol_error), an identity admit() does not allow (errc::unknown_sender,
    /// errc::plan_mismatch) or a sender id that is already connected
    /// (errc::invalid_argument; a predecessor whose end of connection this side has not
    /// read yet counts as gone once its socket shows that end); otherwise exchanges QP
    /// numbers, PSNs and GIDs, sends the region table and brings its QPs to RTS.
    /// Completion void(std::error_code, std::uint32_t sender): the sender's id (0 when it
    /// never said). A refused or failed sender is gone; the receiver keeps listening and
    /// serving the others: call async_accept again (several may be pending). The whole
    /// handshake is bounded by options::connect_timeout (asio::error::timed_out), so a
    /// client that says nothing cannot hold it; errc::peer_disconnected when the peer left
    /// mid-handshake. Handshakes run side by side from the first call until close() (at
    /// most options::max_pending_handshakes, counting ended ones not yet taken; further
    /// peers wait in the listen backlog): each call takes the result of the next to end.
    /// Cancellation (any type): completes with operation_aborted; handshakes in progress go
    /// on, their results kept for later calls.
    template <class Token>
    auto async_accept(Token&& token) {
      return asio::async_compose<Token, void(std::error_code, std::uint32_t)>(
          accept_op{state_, transport_->opts_.connect_timeout}, token, transport_->executor_);
    }

    /// Completes with void(std::error_code, notice) for each notice of each sender, in
    /// each sender's order (the sender's async_notify completes once it is queued here).
    /// When a sender leaves: errc::peer_disconnected and notice {sender, abort, 0}, after
    /// every notice it sent before; its QPs are torn down, the others are served on. A
    /// sender that sends a malformed frame: errc::protocol_error with such a notice, and
    /// its connection is dropped. errc::not_connected after close(); operation_aborted for
    /// a wait pending at close(). Cancellation: any type, this wait only (no side effects).
    template <class Token>
    auto async_wait_notification(Token&& token) {
      return asio::async_initiate<Token, void(std::error_code, notice)>(
          [](auto handler, std::shared_ptr<state_type> s) { s->start_wait(std::move(handler)); },
          token, state_);
    }

    /// Stops accepting, moves every QP to ERR, closes every control connection, fails
    /// pending waits. Never throws.
    void close() noexcept {
      if (state_) state_->close();
    }

  private:
    using peer = typename state_type::peer;
    using socket_type = typename state_type::socket_type;

    // What the verbs receiver adds to the shared handshake: whom it admits (a sender id
    // already connected is refused, unless that connection is over), then the QP exchange
    // and the region table.
    struct accept_hooks {
      std::shared_ptr<state_type> state;
      std::shared_ptr<peer> p;

      shardline::detail::judgement judge(const sender_identity& who) const {
        bool retry = false;
        const auto refusal = state->check(p, who, retry);
        // The same sender's previous connection hung up with notices still unread: the
        // handshake asks again once the loop read them and its end.
        if (retry) return {refusal, true};
        if (!refusal) state->claim(p, who.sender);
        return {refusal};
      }

      // The sender proved the key: its notices and our acks are sealed from now on.
      void authenticated(shardline::detail::session_key key) const {
        p->seal = shardline::detail::notice_seal(std::move(key), shardline::detail::seal_direction::ack);
      }

      template <class Handler>
      void operator()(socket_type&, const sender_identity&, Handler&& handler) const {
        asio::async_compose<std::decay_t<Handler>, void(std::error_code)>(
            qp_exchange{state, p, std::make_unique<exchange_data>()}, handler, state->acceptor().get_executor());
      }
    };

    struct exchange_data {
      std::string in;
      std::string out;
      ibv_gid gid{};
      std::size_t qps = 0;
    };

    // Reads the sender's QPs, brings ours to RTR/RTS against them, answers with ours and the
    // region table.
    struct qp_exchange {
      std::shared_ptr<state_type> state;
      std::shared_ptr<peer> p;
      std::unique_ptr<exchange_data> d;
      enum class step { start, fixed_read, qps_read, binding, answered } at = step::start;

      template <class Self>
      void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
        if (ec) return self.complete(ec);
        switch (at) {
          case step::start:
            d->in.resize(detail::wire_fixed);
            at = step::fixed_read;
            return asio::async_read(p->socket, asio::buffer(d->in), std::move(self));
          case step::fixed_read:
            d->qps = detail::decode_fixed(d->in, d->gid, state->opts().max_queue_pairs);
            if (!d->qps) return self.complete(make_error_code(errc::protocol_error));
            d->in.resize(8 * d->qps);
            at = step::qps_read;
            return asio::async_read(p->socket, asio::buffer(d->in), std::move(self));
          case step::qps_read:
            try {
              state->prepare(*p, d->qps);  // QPs and, with windows, this sender's own windows
              const auto remote = detail::decode_qps(d->in, d->qps);
              std::vector<qp_endpoint> mine;
              for (std::size_t i = 0; i < d->qps; ++i) {
                if (auto e = p->qps[i]->connect(d->gid, remote[i], state->opts())) return self.complete(e);
                mine.push_back(p->qps[i]->local());
              }
              d->out = detail::encode_endpoints(state->dev()->gid(), mine);
            } catch (const std::system_error& e) {
              return self.complete(e.code());
            }
            at = step::binding;
            [[fallthrough]];
          case step::binding: {
            // Every window is bound before its rkey leaves: no write can outrun its bind.
            std::error_code e;
            if (!p->bind_step(e)) {
              if (!e && (!p->socket.is_open() ||  // the handshake's deadline closed it
                         self.get_cancellation_state().cancelled() != asio::cancellation_type::none))
                e = asio::error::operation_aborted;
              if (e) return self.complete(e);
              return asio::post(p->socket.get_executor(), std::move(self));
            }
            const std::string table = state->table().serialize();
            shardline::detail::put_le<std::uint64_t>(d->out, table.size());
            d->out += table;
            d->out += detail::encode_window_keys(d->qps, p->key_rows());
            at = step::answered;
            return asio::async_write(p->socket, asio::buffer(d->out), std::move(self));
          }
          case step::answered:
            return self.complete(std::error_code{});
        }
      }
    };

    // What shardline::detail::accept_peers asks of the transport: one accepted peer's
    // handshake, the QP exchange included, and the sender served once admitted.
    struct accept_driver {
      std::weak_ptr<state_type> state;
      std::chrono::milliseconds timeout;

      std::shared_ptr<state_type> lock() const { return state.lock(); }
      auto& listener(state_type& s) const { return s.handshakes(); }
      auto& acceptor(state_type& s) const { return s.acceptor(); }
      std::shared_ptr<peer> make_pending(state_type& s) const { return s.new_peer(); }
      template <class Done>
      void handshake(state_type& s, std::shared_ptr<peer> p, Done done) const {
        shardline::detail::async_handshake_accepted(std::shared_ptr<socket_type>(p, &p->socket), detail::hello_magic,
                                                    timeout, s.opts().key, accept_hooks{state.lock(), p},
                                                    std::move(done));
      }
      std::error_code admit(state_type& s, const std::shared_ptr<peer>& p, std::error_code ec,
                            sender_identity) const {
        if (!ec && s.closed()) ec = make_error_code(errc::not_connected);
        if (ec) {
          s.forget(p);
          return ec;
        }
        s.serve(p);
        return {};
      }
    };

    struct accept_op {
      std::shared_ptr<state_type> state;
      std::chrono::milliseconds timeout;
      bool refused = false;  // closed before it started: completed through a post

      template <class Self>
      void operator()(Self& self) {
        if (refused) return self.complete(make_error_code(errc::not_connected), 0u);
        if ((refused = state->closed())) return asio::post(state->acceptor().get_executor(), std::move(self));
        self.reset_cancellation_state(asio::enable_total_cancellation());
        const accept_driver driver{state, timeout};  // before `self` (this op with it) moves into the wait
        state->handshakes().take(std::move(self));
        shardline::detail::accept_peers(driver);
      }

      template <class Self>
      void operator()(Self& self, std::error_code ec, std::uint32_t sender) {
        self.complete(ec, sender);
      }
    };

    basic_verbs_transport* transport_;
    std::shared_ptr<state_type> state_;
  };

  /// Connects to the receiver listening at `peer` as sender `who`: TCP control
  /// connection, hello and verdict, then QP set-up (INIT -> RTR -> RTS) and the region
  /// table. Completion void(std::error_code, connection): errc::authentication_failed when
  /// the receiver does not hold options::key (another key, or none; or, keyless, when it
  /// asks for one), before our QPs are sent; the receiver's refusal
  /// (errc::unknown_sender, errc::plan_mismatch, errc::invalid_argument when a sender with
  /// this id is connected, errc::protocol_version_mismatch); the system error of connect;
  /// asio::error::timed_out after options::connect_timeout; errc::peer_disconnected when
  /// the receiver went away mid-handshake; errc::protocol_error for a malformed reply.
  /// Cancellation (any type): completes with operation_aborted.
  template <class Token>
  auto async_connect(asio::ip::tcp::endpoint peer, sender_identity who, Token&& token) {
    return asio::async_compose<Token, void(std::error_code, connection)>(connect_op{this, peer, who}, token,
                                                                         executor_);
  }
  /// As sender_identity{} (sender 0, no plan).
  template <class Token>
  auto async_connect(asio::ip::tcp::endpoint peer, Token&& token) {
    return async_connect(peer, sender_identity{}, std::forward<Token>(token));
  }

private:
  // `kinds` (source_kinds or destination_kinds, both host memory), and cuda_device when the
  // options can register it.
  static memory_kinds with_device_memory(memory_kinds kinds, const options& o) noexcept {
    static_assert(source_kinds == memory_kinds{memory_kind::host, memory_kind::host_pinned} &&
                  destination_kinds == source_kinds);
    if (!o.register_device_memory) return kinds;
    return {memory_kind::host, memory_kind::host_pinned, memory_kind::cuda_device};
  }

  static options require_key_choice(options o) {
    if (!o.key && !o.allow_unauthenticated)
      throw error(make_error_code(errc::invalid_argument),
                  "verbs transport: options::key is not set: give both ends the same key "
                  "(shardline::shared_key::from_file or from_environment), or set "
                  "options::allow_unauthenticated = true to let anyone who reaches the control port write "
                  "the weights");
    return o;
  }

  using cstate = detail::connection_state<Mode, Executor>;
  using socket_type = typename cstate::socket_type;

  // What the verbs sender adds to the shared handshake once admitted: our QPs out, the
  // receiver's QPs and its region table in, our QPs to RTR/RTS against them.
  struct qp_exchange {
    std::shared_ptr<cstate> state;
    std::shared_ptr<device> dev;
    std::size_t qps;
    std::uint64_t max_table_bytes;  // options::max_table_bytes
    std::unique_ptr<std::string> buf = std::make_unique<std::string>();
    enum class step { start, sent, endpoints_read, table_read, keys_fixed_read, keys_read } at = step::start;

    template <class Self>
    void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
      if (ec) return self.complete(ec);
      switch (at) {
        case step::start:
          *buf = detail::encode_endpoints(dev->gid(), state->endpoints());
          at = step::sent;
          return asio::async_write(state->socket(), asio::buffer(*buf), std::move(self));
        case step::sent:
          buf->assign(detail::wire_fixed + 8 * qps + 8, '\0');
          at = step::endpoints_read;
          return asio::async_read(state->socket(), asio::buffer(*buf), std::move(self));
        case step::endpoints_read: {
          ibv_gid gid{};
          if (detail::decode_fixed(*buf, gid, qps) != qps) return self.complete(make_error_code(errc::protocol_error));
          const std::string_view rest = std::string_view(*buf).substr(detail::wire_fixed);
          const auto remote = detail::decode_qps(rest, qps);
          const auto len = shardline::detail::get_le<std::uint64_t>(rest.data() + 8 * qps);
          if (len > max_table_bytes) return self.complete(make_error_code(errc::protocol_error));
          if (auto e = state->connect_qps(gid, remote)) return self.complete(e);
          buf->assign(static_cast<std::size_t>(len), '\0');
          at = step::table_read;
          return asio::async_read(state->socket(), asio::buffer(*buf), std::move(self));
        }
        case step::table_read: {
          std::error_code e;
          state->table = region_table::parse(*buf, e);
          if (e) return self.complete(e);
          buf->assign(detail::keys_fixed, '\0');
          at = step::keys_fixed_read;
          return asio::async_read(state->socket(), asio::buffer(*buf), std::move(self));
        }
        case step::keys_fixed_read: {
          std::size_t rows = 0;
          if (!detail::decode_keys_fixed(*buf, qps, rows)) return self.complete(make_error_code(errc::protocol_error));
          buf->assign(4 * rows * (1 + qps), '\0');
          at = step::keys_read;
          return asio::async_read(state->socket(), asio::buffer(*buf), std::move(self));
        }
        case step::keys_read:
          return self.complete(state->set_window_keys(detail::decode_key_rows(*buf, buf->size() / 4)));
      }
    }
  };

  struct connect_exchange {
    std::shared_ptr<cstate> state;
    std::shared_ptr<device> dev;
    std::size_t qps;
    std::uint64_t max_table_bytes;
    // The receiver proved the key: our notices and its acks are sealed from now on.
    void authenticated(shardline::detail::session_key key) const { state->seal_control(std::move(key)); }
    template <class Handler>
    void operator()(socket_type& socket, Handler&& handler) const {
      asio::async_compose<std::decay_t<Handler>, void(std::error_code)>(qp_exchange{state, dev, qps, max_table_bytes}, handler,
                                                                        socket.get_executor());
    }
  };

  struct connect_op {
    basic_verbs_transport* t;
    asio::ip::tcp::endpoint peer;
    sender_identity who;
    std::shared_ptr<cstate> state;
    std::error_code refused;  // before any handshake: completed through a post

    template <class Self>
    void operator()(Self& self) {
      if (refused) return self.complete(refused, connection(t->executor_, nullptr));
      try {
        state = std::make_shared<cstate>(t->executor_, t->device_, t->opts_, who);
        state->init();
      } catch (const std::system_error& e) {
        refused = e.code();
        return asio::post(t->executor_, std::move(self));
      }
      self.reset_cancellation_state(asio::enable_total_cancellation());
      shardline::detail::async_handshake_as_sender(
          std::shared_ptr<socket_type>(state, &state->socket()), peer, detail::hello_magic, who,
          t->opts_.connect_timeout, t->opts_.key, connect_exchange{state, t->device_, t->opts_.queue_pairs,
                                                             t->opts_.max_table_bytes},
          std::move(self));
    }

    template <class Self>
    void operator()(Self& self, std::error_code ec) {
      if (ec) {
        state->close();
        return self.complete(ec, connection(t->executor_, nullptr));
      }
      state->start_control();
      self.complete(ec, connection(t->executor_, std::move(state)));
    }
  };

  executor_type executor_;
  options opts_;
  std::shared_ptr<device> device_;
};

using verbs_transport = basic_verbs_transport<>;

/// A failed write in words, for error messages: which region it targeted (by the
/// receiver's table) and why, e.g. "write of 64 bytes at +0 of region 'layer0.w':
/// remote access error".
inline std::string describe(const region_table& table, const write_request& w,
                            const std::error_code& ec) {
  std::string s = "write of " + std::to_string(w.source.size()) + " bytes ";
  if (const auto* r = table.find(w.remote_address, w.source.size()))
    s += "at +" + std::to_string(w.remote_address - r->address) + " of region '" + r->name + "'";
  else if (const auto* r2 = table.find(w.remote_address, 0))
    s += "overrunning region '" + r2->name + "' (" + std::to_string(r2->length) + " bytes)";
  else
    s += "to an address outside every exposed region";
  return s + ": " + ec.message();
}

static_assert(shardline::transport<verbs_transport>);

}  // namespace shardline::verbs

namespace shardline {
// Beside shardline::loopback_transport and shardline::shm_transport; the class is no longer
// called verbs::transport, a name that read as the concept shardline::transport.
using verbs::basic_verbs_transport;
using verbs::verbs_transport;
}  // namespace shardline
