// shardline/transport/verbs/transport.hpp: RDMA WRITE over libibverbs RC queue pairs, with the CQs
// polled by the io_context and a TCP control connection per sender for admission, the QP
// exchange, the region table and the notices. Satisfies shardline::transport.
#pragma once

#include <shardline/transport/detail/control.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/verbs/completion_queue.hpp>
#include <shardline/transport/verbs/detail/connection_state.hpp>
#include <shardline/transport/verbs/detail/receiver_state.hpp>
#include <shardline/transport/verbs/detail/wire.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/error.hpp>
#include <shardline/transport/verbs/memory_region.hpp>
#include <shardline/transport/verbs/options.hpp>
#include <shardline/transport/verbs/queue_pair.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/basic_waitable_timer.hpp>
#include <asio/compose.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>

#include <array>
#include <chrono>
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
/// (shardline::detail::encode_hello("SLVB", identity)); the receiver's verdict (admitted,
/// or the errc of the refusal, after which it closes that socket); only once admitted, the
/// QP exchange and the region table (detail/wire.hpp); then notice frames, each
/// acknowledged by its echo. Its end is how each side learns that the other left.
///
/// Thread safety: distinct objects safe; shared objects unsafe. Every object of one
/// transport is used from the executor's thread (an io_context run by one thread, or a
/// strand). No threads of its own: completions run as handlers on the executor.
template <poll_mode Mode = poll_mode::adaptive, class Executor = asio::any_io_executor>
class basic_verbs_transport {
  using timer_type = asio::basic_waitable_timer<std::chrono::steady_clock,
                                                asio::wait_traits<std::chrono::steady_clock>,
                                                Executor>;
  // A handshake's deadline, shared with its timer's handler: `over` once the handshake
  // ended, so a timer that fired late leaves a finished connection alone.
  struct deadline {
    bool expired = false;
    bool over = false;
  };

public:
  using executor_type = Executor;
  static constexpr poll_mode mode = Mode;
  /// RDMA WRITE reads and writes registered host memory of either kind (CUDA: not yet).
  static constexpr memory_kinds source_kinds{memory_kind::host, memory_kind::host_pinned};
  static constexpr memory_kinds destination_kinds{memory_kind::host, memory_kind::host_pinned};

  /// Opens the device. Throws shardline::error(errc::no_device, "no RDMA device: ...")
  /// when there is none (or the named one is missing, or has no active port / RoCE v2
  /// IPv4 GID).
  explicit basic_verbs_transport(const executor_type& ex, options opts = {})
      : executor_(ex),
        opts_(std::move(opts)),
        device_(std::make_shared<device>(opts_.device, opts_.port, opts_.gid_index)) {}

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

  /// Registers exactly `bytes`, which live at `where`. Throws shardline::error:
  /// errc::unsupported_memory for a kind outside source_kinds, the errno of ibv_reg_mr
  /// when it fails.
  registration register_memory(std::span<std::byte> bytes, memory_location where = {}) {
    require_kind(source_kinds, where, "the verbs transport", "staging memory");
    return registration(memory_region(device_, bytes, 0), where);
  }

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
      detail::erase_handler<std::error_code>(std::forward<Handler>(handler), ex)
          ->complete(make_error_code(errc::not_connected));
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
    /// Throws shardline::error naming the region: errc::unsupported_memory for a kind
    /// outside destination_kinds, errc::invalid_argument for a name given twice or an
    /// overlap, ibv_reg_mr's errno (with its text) when the registration fails. Expose
    /// before accepting: each sender receives the table when it connects.
    void expose(exposure e) {
      require_kind(destination_kinds, e.location, "the verbs transport",
                   "region '" + e.name + "'");
      state_->expose(std::move(e));
    }
    /// A host byte region.
    void expose(std::string name, std::span<std::byte> bytes) {
      expose(exposure{std::move(name), bytes, {}, {}});
    }

    /// Whom async_accept admits from now on (default: anyone).
    void admit(admission a) noexcept { state_->admit(a); }

    const region_table& regions() const noexcept { return state_->table(); }

    /// Accepts one sender: reads its hello; refuses it (verdict, then closes that socket)
    /// for another protocol version (errc::protocol_version_mismatch), garbage
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
    /// mid-handshake. Cancellation: as the underlying socket operations.
    template <class Token>
    auto async_accept(Token&& token) {
      return asio::async_compose<Token, void(std::error_code, std::uint32_t)>(
          accept_op{state_, nullptr, 0, transport_->opts_.connect_timeout}, token,
          transport_->executor_);
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

    struct accept_data {
      explicit accept_data(const Executor& ex) : timer(ex) {}
      std::shared_ptr<peer> p;
      timer_type timer;
      std::shared_ptr<deadline> clock = std::make_shared<deadline>();
      shardline::detail::hello_frame hello{};
      std::array<std::byte, shardline::detail::verdict_bytes> verdict{};
      std::string in;
      std::string out;
      ibv_gid gid{};
      std::size_t qps = 0;
      sender_identity who;
      std::error_code refusal;
      unsigned yields = 0;
    };

    struct accept_op {
      std::shared_ptr<state_type> state;
      std::unique_ptr<accept_data> d;
      int step;
      std::chrono::milliseconds timeout;

      template <class Self>
      void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
        switch (step) {
          case 0:
            d = std::make_unique<accept_data>(state->acceptor().get_executor());
            if (state->closed()) {
              step = 99;
              return asio::post(state->acceptor().get_executor(), std::move(self));
            }
            d->p = state->new_peer();
            step = 1;
            return state->acceptor().async_accept(d->p->socket, std::move(self));
          case 1:
            if (ec) return fail(self, ec);
            d->timer.expires_after(timeout);
            d->timer.async_wait([clock = d->clock, w = std::weak_ptr<peer>(d->p)](std::error_code e) {
              if (e || clock->over) return;
              clock->expired = true;
              if (auto p = w.lock()) {
                std::error_code ignored;
                p->socket.close(ignored);
              }
            });
            step = 2;
            return asio::async_read(d->p->socket, asio::buffer(d->hello), std::move(self));
          case 2:
            if (ec) return fail(self, ec);
            d->refusal = shardline::detail::decode_hello(detail::hello_magic, d->hello, d->who);
            step = 3;
            [[fallthrough]];
          case 3: {
            bool retry = false;
            if (!d->refusal) d->refusal = state->check(d->p, d->who, retry);
            if (retry && d->yields++ < max_yields) {
              // The same sender's previous connection hung up with notices still unread:
              // let the loop read them and its end, then look again.
              d->refusal.clear();
              return asio::post(state->acceptor().get_executor(), std::move(self));
            }
            if (!d->refusal) state->claim(d->p, d->who.sender);
            d->verdict = shardline::detail::encode_verdict(d->refusal);
            step = 4;
            return asio::async_write(d->p->socket, asio::buffer(d->verdict), std::move(self));
          }
          case 4:
            if (d->refusal) return fail(self, d->refusal);
            if (ec) return fail(self, ec);
            d->in.resize(detail::wire_fixed);
            step = 5;
            return asio::async_read(d->p->socket, asio::buffer(d->in), std::move(self));
          case 5:
            if (ec) return fail(self, ec);
            d->qps = detail::decode_fixed(d->in, d->gid);
            if (!d->qps) return fail(self, make_error_code(errc::protocol_error));
            d->in.resize(8 * d->qps);
            step = 6;
            return asio::async_read(d->p->socket, asio::buffer(d->in), std::move(self));
          case 6: {
            if (ec) return fail(self, ec);
            try {
              d->p->init(state->dev(), d->qps);
              const auto remote = detail::decode_qps(d->in, d->qps);
              std::vector<qp_endpoint> mine;
              for (std::size_t i = 0; i < d->qps; ++i) {
                if (auto e = d->p->qps[i]->connect(d->gid, remote[i], state->opts()))
                  return fail(self, e);
                mine.push_back(d->p->qps[i]->local());
              }
              d->out = detail::encode_endpoints(state->dev()->gid(), mine);
              const std::string table = state->table().serialize();
              shardline::detail::put_le<std::uint64_t>(d->out, table.size());
              d->out += table;
            } catch (const std::system_error& e) {
              return fail(self, e.code());
            }
            step = 7;
            return asio::async_write(d->p->socket, asio::buffer(d->out), std::move(self));
          }
          case 7:
            if (ec) return fail(self, ec);
            if (state->closed()) return fail(self, make_error_code(errc::not_connected));
            d->clock->over = true;
            d->timer.cancel();
            state->serve(d->p);
            return self.complete(std::error_code{}, d->who.sender);
          default:
            return self.complete(make_error_code(errc::not_connected), 0u);
        }
      }

      template <class Self>
      void fail(Self& self, std::error_code ec) {
        d->clock->over = true;
        d->timer.cancel();
        ec = d->clock->expired ? std::error_code(asio::error::timed_out) : detail::handshake_error(ec);
        state->forget(d->p);
        self.complete(ec, d->who.sender);
      }
    };

    // Posts (each a trip through the reactor) spent waiting for a hung-up connection of the
    // same sender to be read to its end; past them the newcomer is refused.
    static constexpr unsigned max_yields = 64;

    basic_verbs_transport* transport_;
    std::shared_ptr<state_type> state_;
  };

  /// Connects to the receiver listening at `peer` as sender `who`: TCP control
  /// connection, hello and verdict, then QP set-up (INIT -> RTR -> RTS) and the region
  /// table. Completion void(std::error_code, connection): the receiver's refusal
  /// (errc::unknown_sender, errc::plan_mismatch, errc::invalid_argument when a sender with
  /// this id is connected, errc::protocol_version_mismatch); the system error of connect;
  /// asio::error::timed_out after options::connect_timeout; errc::peer_disconnected when
  /// the receiver went away mid-handshake; errc::protocol_error for a malformed reply.
  /// Cancellation: as the underlying socket operations.
  template <class Token>
  auto async_connect(asio::ip::tcp::endpoint peer, sender_identity who, Token&& token) {
    return asio::async_compose<Token, void(std::error_code, connection)>(
        connect_op{this, peer, who, nullptr, 0}, token, executor_);
  }
  /// As sender_identity{} (sender 0, no plan).
  template <class Token>
  auto async_connect(asio::ip::tcp::endpoint peer, Token&& token) {
    return async_connect(peer, sender_identity{}, std::forward<Token>(token));
  }

private:
  using cstate = detail::connection_state<Mode, Executor>;

  struct connect_data {
    explicit connect_data(const Executor& ex) : timer(ex) {}
    std::shared_ptr<cstate> state;
    timer_type timer;
    std::shared_ptr<deadline> clock = std::make_shared<deadline>();
    shardline::detail::hello_frame hello{};
    std::array<std::byte, shardline::detail::verdict_bytes> verdict{};
    std::string buf;
    std::size_t qps = 0;
    std::error_code ec;
  };

  struct connect_op {
    basic_verbs_transport* t;
    asio::ip::tcp::endpoint peer;
    sender_identity who;
    std::unique_ptr<connect_data> d;
    int step;

    template <class Self>
    void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
      switch (step) {
        case 0: {
          d = std::make_unique<connect_data>(t->executor_);
          try {
            d->state = std::make_shared<cstate>(t->executor_, t->device_, t->opts_, who);
            d->state->init();
          } catch (const std::system_error& e) {
            d->ec = e.code();
            step = 99;
            return asio::post(t->executor_, std::move(self));
          }
          d->qps = t->opts_.queue_pairs;
          d->timer.expires_after(t->opts_.connect_timeout);
          d->timer.async_wait([clock = d->clock,
                               w = std::weak_ptr<cstate>(d->state)](std::error_code e) {
            if (e || clock->over) return;
            clock->expired = true;
            if (auto s = w.lock()) {
              std::error_code ignored;
              s->socket().close(ignored);
            }
          });
          step = 1;
          return d->state->socket().async_connect(peer, std::move(self));
        }
        case 1:
          if (ec) return done(self, ec);
          d->hello = shardline::detail::encode_hello(detail::hello_magic, who);
          step = 2;
          return asio::async_write(d->state->socket(), asio::buffer(d->hello), std::move(self));
        case 2:
          if (ec) return done(self, ec);
          step = 3;
          return asio::async_read(d->state->socket(), asio::buffer(d->verdict), std::move(self));
        case 3:
          if (ec) return done(self, ec);
          if (auto refused = shardline::detail::decode_verdict(d->verdict)) return done(self, refused);
          d->buf = detail::encode_endpoints(t->device_->gid(), d->state->endpoints());
          step = 4;
          return asio::async_write(d->state->socket(), asio::buffer(d->buf), std::move(self));
        case 4:
          if (ec) return done(self, ec);
          d->buf.assign(detail::wire_fixed + 8 * d->qps + 8, '\0');
          step = 5;
          return asio::async_read(d->state->socket(), asio::buffer(d->buf), std::move(self));
        case 5: {
          if (ec) return done(self, ec);
          ibv_gid gid{};
          if (detail::decode_fixed(d->buf, gid) != d->qps)
            return done(self, make_error_code(errc::protocol_error));
          const std::string_view rest = std::string_view(d->buf).substr(detail::wire_fixed);
          const auto remote = detail::decode_qps(rest, d->qps);
          const auto len = shardline::detail::get_le<std::uint64_t>(rest.data() + 8 * d->qps);
          if (len > detail::wire_max_table) return done(self, make_error_code(errc::protocol_error));
          if (auto e = d->state->connect_qps(gid, remote)) return done(self, e);
          d->buf.assign(static_cast<std::size_t>(len), '\0');
          step = 6;
          return asio::async_read(d->state->socket(), asio::buffer(d->buf), std::move(self));
        }
        case 6: {
          if (ec) return done(self, ec);
          std::error_code pe;
          d->state->table = region_table::parse(d->buf, pe);
          return done(self, pe);
        }
        default:
          return done(self, d->ec);
      }
    }

    template <class Self>
    void done(Self& self, std::error_code ec) {
      d->clock->over = true;
      d->timer.cancel();
      if (d->clock->expired) ec = asio::error::timed_out;
      else ec = detail::handshake_error(ec);
      if (ec) {
        if (d->state) d->state->close();
        return self.complete(ec, connection(t->executor_, nullptr));
      }
      d->state->start_control();
      return self.complete(ec, connection(t->executor_, std::move(d->state)));
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
