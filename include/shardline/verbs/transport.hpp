// shardline/verbs/transport.hpp: RDMA WRITE over libibverbs RC queue pairs, with the CQs
// polled by the io_context. Satisfies shardline::transport.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport.hpp>
#include <shardline/verbs/completion_queue.hpp>
#include <shardline/verbs/detail/connection_state.hpp>
#include <shardline/verbs/detail/receiver_state.hpp>
#include <shardline/verbs/detail/wire.hpp>
#include <shardline/verbs/device.hpp>
#include <shardline/verbs/error.hpp>
#include <shardline/verbs/memory_region.hpp>
#include <shardline/verbs/options.hpp>
#include <shardline/verbs/queue_pair.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/basic_waitable_timer.hpp>
#include <asio/compose.hpp>
#include <asio/connect.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>

#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>

namespace shardline::verbs {

/// The verbs transport: one device (context + PD) per transport object.
///
/// Sender: register_memory() once per staging arena (local access only), async_connect()
/// to a receiver's control endpoint, then connection::async_write / async_write_notify.
/// Receiver: allocate() arenas (registered once with remote write), expose() named
/// regions inside them, async_accept() each sender, async_wait_notification().
///
/// Thread safety: distinct objects safe; shared objects unsafe. Every object of one
/// transport is used from the executor's thread (an io_context run by one thread, or a
/// strand). No threads of its own: completions run as handlers on the executor.
template <poll_mode Mode = poll_mode::adaptive, class Executor = asio::any_io_executor>
class basic_transport {
public:
  using executor_type = Executor;
  static constexpr poll_mode mode = Mode;

  /// Opens the device. Throws shardline::error(errc::no_device, "no RDMA device: ...")
  /// when there is none (or the named one is missing, or has no active port / RoCE v2
  /// IPv4 GID).
  explicit basic_transport(const executor_type& ex, options opts = {})
      : executor_(ex),
        opts_(std::move(opts)),
        device_(std::make_shared<device>(opts_.device, opts_.port, opts_.gid_index)) {}

  executor_type get_executor() const noexcept { return executor_; }
  const options& get_options() const noexcept { return opts_; }
  const device& get_device() const noexcept { return *device_; }

  /// The sender's staging memory, registered once (local access only). Move-only RAII.
  class registration {
  public:
    registration() = default;
    local_region region() const noexcept { return mr_.region(); }

  private:
    friend class basic_transport;
    explicit registration(memory_region mr) : mr_(std::move(mr)) {}
    memory_region mr_;
  };

  /// Registers exactly `bytes`; throws shardline::error when ibv_reg_mr fails.
  registration register_memory(std::span<std::byte> bytes) {
    return registration(memory_region(device_, bytes, 0));
  }

  /// A sender's connection to one receiver: `queue_pairs` RC QPs sharing one CQ.
  /// Satisfies shardline::transport_connection. Move-only; destroying or closing it
  /// moves its QPs to ERR: pending writes complete with operation_aborted.
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

    /// False once closed, once the peer's control connection ended, or once any QP went
    /// to the error state (a failed or cancelled write): such a connection is never
    /// reused; later writes fail at once with errc::connection_failed (or not_connected,
    /// peer_disconnected). Connect again instead.
    bool is_open() const noexcept { return state_ && state_->is_open(); }

    /// Writes every request of `batch` (each one split at the port's max message size,
    /// striped over the QPs, posted in chains of at most max_wr_per_post, never more WRs
    /// than the QPs and the CQ can hold: the rest waits). Completion signature
    /// void(std::error_code): success once every WR completed; a failed work completion
    /// gives std::error_code(wc.status, wc_category()) (message: ibv_wc_status_str) and
    /// fails the connection. The span is read during initiation; the source bytes must
    /// stay untouched until completion.
    /// Cancellation: terminal only. It moves the QPs to ERR: this op and every other one
    /// outstanding complete with operation_aborted, and the connection is not reusable.
    template <class Token>
    auto async_write(std::span<const write_request> batch, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(initiate_write{this}, token,
                                                                batch, false, 0u);
    }

    /// As async_write, then an RDMA WRITE WITH IMMEDIATE carrying `notification`: the
    /// receiver's async_wait_notification completes with it after the batch (and every
    /// earlier one of this connection) is visible there.
    template <class Token>
    auto async_write_notify(std::span<const write_request> batch, std::uint32_t notification,
                            Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(initiate_write{this}, token,
                                                                batch, true, notification);
    }

    /// Pending writes complete with operation_aborted; later ones with not_connected.
    void close() noexcept {
      if (state_) state_->close();
    }

  private:
    friend class basic_transport;
    connection(const Executor& ex, std::shared_ptr<state_type> s)
        : state_(std::move(s)), executor_(ex) {}

    struct initiate_write {
      connection* self;
      template <class Handler>
      void operator()(Handler&& handler, std::span<const write_request> batch, bool notify,
                      std::uint32_t value) const {
        if (!self->state_) {
          auto ex = asio::get_associated_executor(handler);
          detail::erase_handler<std::error_code>(std::forward<Handler>(handler), ex)
              ->complete(make_error_code(errc::not_connected));
          return;
        }
        self->state_->start_write(batch, notify, value, std::forward<Handler>(handler));
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

    /// Binds and listens on `listen` (port 0: ephemeral). Throws std::system_error when
    /// the address cannot be bound.
    receiver(basic_transport& t, asio::ip::tcp::endpoint listen)
        : transport_(&t),
          state_(std::make_shared<state_type>(t.executor_, t.device_, t.opts_, listen)) {}
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

    /// Names a range inside an arena in the region table ({addr, len, the arena's rkey}).
    /// Throws shardline::error(errc::invalid_argument) naming the region when it lies
    /// outside every arena or the name is taken. Expose before accepting: each sender
    /// receives the table at connection time.
    void expose(std::string name, std::span<std::byte> bytes) {
      state_->expose(std::move(name), bytes);
    }

    const region_table& regions() const noexcept { return state_->table(); }

    /// Accepts one sender: exchanges QP numbers, PSNs, GIDs and the region table, brings
    /// its QPs to RTS with zero-length receives posted. Completion void(std::error_code);
    /// errc::protocol_error for a malformed hello. Cancellation: as the underlying
    /// socket operations (terminal, partial).
    template <class Token>
    auto async_accept(Token&& token) {
      return asio::async_compose<Token, void(std::error_code)>(
          accept_op{state_, nullptr, 0}, token, transport_->executor_);
    }

    /// Completes with void(std::error_code, std::uint32_t) for each notification
    /// (RDMA WRITE WITH IMMEDIATE) in arrival order; with errc::peer_disconnected once a
    /// sender's control connection ended and every earlier notification was delivered;
    /// operation_aborted after close(). Cancellation: terminal, this wait only.
    /// The receives behind notifications are reposted while a wait is pending (the CQ is
    /// polled only then): a sender may run at most options::max_send_wr notifications
    /// per QP ahead of the waits, past that it sees RNR retries and then an error.
    template <class Token>
    auto async_wait_notification(Token&& token) {
      return asio::async_initiate<Token, void(std::error_code, std::uint32_t)>(
          [](auto handler, std::shared_ptr<state_type> s) {
            s->start_wait(std::move(handler));
          },
          token, state_);
    }

    /// Stops accepting, moves every QP to ERR, fails pending waits. Never throws.
    void close() noexcept {
      if (state_) state_->close();
    }

  private:
    struct accept_data {
      std::shared_ptr<typename state_type::peer> peer;
      std::string in;
      std::string out;
      ibv_gid gid{};
      std::size_t qps = 0;
      std::error_code ec;
    };

    struct accept_op {
      std::shared_ptr<state_type> state;
      std::unique_ptr<accept_data> d;
      int step;

      template <class Self>
      void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
        if (!d) d = std::make_unique<accept_data>();
        switch (step) {
          case 0:
            step = 1;
            if (state->closed()) {
              d->ec = make_error_code(errc::not_connected);
              step = 99;
              return asio::post(state->acceptor().get_executor(), std::move(self));
            }
            d->peer = std::make_shared<typename state_type::peer>(
                state.get(), state->acceptor().get_executor());
            return state->acceptor().async_accept(d->peer->socket, std::move(self));
          case 1:
            if (ec) return self.complete(ec);
            step = 2;
            d->in.resize(detail::wire_fixed);
            return asio::async_read(d->peer->socket, asio::buffer(d->in), std::move(self));
          case 2:
            if (ec) return self.complete(ec);
            d->qps = detail::decode_fixed(d->in, d->gid);
            if (!d->qps) return self.complete(make_error_code(errc::protocol_error));
            step = 3;
            d->in.resize(8 * d->qps);
            return asio::async_read(d->peer->socket, asio::buffer(d->in), std::move(self));
          case 3: {
            if (ec) return self.complete(ec);
            try {
              d->peer->init(state->opts(), state->dev(), d->qps);
              const auto remote = detail::decode_qps(d->in, d->qps);
              std::vector<qp_endpoint> mine;
              for (std::size_t i = 0; i < d->qps; ++i) {
                if (auto e = d->peer->qps[i]->connect(d->gid, remote[i], state->opts()))
                  return self.complete(e);
                mine.push_back(d->peer->qps[i]->local());
              }
              d->out = detail::encode_endpoints(state->dev()->gid(), mine);
              const std::string table = state->table().serialize();
              detail::put_u64(d->out, table.size());
              d->out += table;
            } catch (const std::system_error& e) {
              return self.complete(e.code());
            }
            step = 4;
            return asio::async_write(d->peer->socket, asio::buffer(d->out), std::move(self));
          }
          case 4:
            if (ec) return self.complete(ec);
            state->add_peer(std::move(d->peer));
            return self.complete(std::error_code{});
          default:
            return self.complete(d->ec);
        }
      }
    };

    basic_transport* transport_;
    std::shared_ptr<state_type> state_;
  };

  /// Connects to the receiver listening at `peer`: TCP control connection, QP set-up
  /// (INIT -> RTR -> RTS) and the region table. Completion
  /// void(std::error_code, connection); asio::error::timed_out after
  /// options::connect_timeout; errc::protocol_error for a malformed reply.
  /// Cancellation: as the underlying socket operations.
  template <class Token>
  auto async_connect(asio::ip::tcp::endpoint peer, Token&& token) {
    return asio::async_compose<Token, void(std::error_code, connection)>(
        connect_op{this, peer, nullptr, 0}, token, executor_);
  }

private:
  using timer_type = asio::basic_waitable_timer<std::chrono::steady_clock,
                                                asio::wait_traits<std::chrono::steady_clock>,
                                                Executor>;
  using cstate = detail::connection_state<Mode, Executor>;

  struct connect_data {
    explicit connect_data(const Executor& ex) : timer(ex) {}
    std::shared_ptr<cstate> state;
    timer_type timer;
    std::shared_ptr<bool> expired = std::make_shared<bool>(false);
    std::string buf;
    std::size_t qps = 0;
    std::error_code ec;
  };

  struct connect_op {
    basic_transport* t;
    asio::ip::tcp::endpoint peer;
    std::unique_ptr<connect_data> d;
    int step;

    template <class Self>
    void operator()(Self& self, std::error_code ec = {}, std::size_t = 0) {
      switch (step) {
        case 0: {
          d = std::make_unique<connect_data>(t->executor_);
          try {
            d->state = std::make_shared<cstate>(t->executor_, t->device_, t->opts_);
            d->state->init();
          } catch (const std::system_error& e) {
            d->ec = e.code();
            step = 99;
            return asio::post(t->executor_, std::move(self));
          }
          d->qps = t->opts_.queue_pairs;
          d->timer.expires_after(t->opts_.connect_timeout);
          d->timer.async_wait([expired = d->expired,
                               w = std::weak_ptr<cstate>(d->state)](std::error_code e) {
            if (e) return;
            *expired = true;
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
          d->buf = detail::encode_endpoints(t->device_->gid(), d->state->endpoints());
          step = 2;
          return asio::async_write(d->state->socket(), asio::buffer(d->buf), std::move(self));
        case 2:
          if (ec) return done(self, ec);
          d->buf.assign(detail::wire_fixed + 8 * d->qps + 8, '\0');
          step = 3;
          return asio::async_read(d->state->socket(), asio::buffer(d->buf), std::move(self));
        case 3: {
          if (ec) return done(self, ec);
          ibv_gid gid{};
          if (detail::decode_fixed(d->buf, gid) != d->qps)
            return done(self, make_error_code(errc::protocol_error));
          const auto remote = detail::decode_qps(
              std::string_view(d->buf).substr(detail::wire_fixed), d->qps);
          const auto len = detail::get_le(d->buf.data() + detail::wire_fixed + 8 * d->qps, 8);
          if (len > detail::wire_max_table) return done(self, make_error_code(errc::protocol_error));
          if (auto e = d->state->connect_qps(gid, remote)) return done(self, e);
          d->buf.assign(static_cast<std::size_t>(len), '\0');
          step = 4;
          return asio::async_read(d->state->socket(), asio::buffer(d->buf), std::move(self));
        }
        case 4: {
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
      d->timer.cancel();
      if (*d->expired) ec = asio::error::timed_out;
      if (ec) {
        if (d->state) d->state->close();
        return self.complete(ec, connection(t->executor_, nullptr));
      }
      return self.complete(ec, connection(t->executor_, std::move(d->state)));
    }
  };

  executor_type executor_;
  options opts_;
  std::shared_ptr<device> device_;
};

using transport = basic_transport<>;

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

static_assert(shardline::transport<transport>);

}  // namespace shardline::verbs
