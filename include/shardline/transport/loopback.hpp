// shardline/transport/loopback.hpp: an in-process transport for testing pipeline logic.
// It copies with memcpy on the calling thread; it is never a stand-in for verbs or shm.
#pragma once

#include <shardline/detail/completion.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/detail/expose.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/associator.hpp>
#include <asio/async_result.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <list>
#include <memory>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

namespace shardline {

namespace detail {
/// A write's handler that reports operation_aborted when its connection closed after the
/// write landed but before it completed, as every transport's pending operations do on close
/// (a failure keeps its own code). It is the handler for Asio: its executor, allocator and
/// cancellation slot are the wrapped handler's (the associator specialisation below).
template <class Handler, class Link>
class aborted_if_closed {
public:
  aborted_if_closed(Handler&& handler, std::shared_ptr<Link> link)
      : handler_(std::move(handler)), link_(std::move(link)) {}
  aborted_if_closed(aborted_if_closed&&) = default;

  void operator()(std::error_code ec) {
    if (link_->closed && !ec) ec = asio::error::operation_aborted;
    std::move(handler_)(ec);
  }

  const Handler& handler() const noexcept { return handler_; }

private:
  Handler handler_;
  std::shared_ptr<Link> link_;
};
}  // namespace detail

/// In-process transport. Remote addresses are plain pointers into the receiver's arenas.
///
/// Thread safety: distinct objects safe; shared objects unsafe. All objects of one
/// transport must be used from the one executor's thread.
template <class Executor = asio::any_io_executor>
class basic_loopback_transport {
  using notice_channel = asio::experimental::channel<Executor, void(std::error_code, notice)>;

  struct receiver_state {
    explicit receiver_state(const Executor& ex, std::size_t depth) : notices(ex, depth) {}
    std::vector<std::unique_ptr<std::byte[]>> arenas;
    region_table table;
    notice_channel notices;
    admission admitted;
    std::unordered_set<std::uint32_t> connected;  // ids of the senders with an open connection
    bool open = true;
  };

public:
  using executor_type = Executor;
  /// memcpy reads and writes host memory of either kind.
  static constexpr memory_kinds source_kinds{memory_kind::host, memory_kind::host_pinned};
  static constexpr memory_kinds destination_kinds{memory_kind::host, memory_kind::host_pinned};

  explicit basic_loopback_transport(const executor_type& ex) : executor_(ex) {}

  executor_type get_executor() const noexcept { return executor_; }

  /// Local memory needs no registration in-process; the type exists for the concept.
  using registration = unregistered_memory;

  /// Throws shardline::error(errc::unsupported_memory) for a kind memcpy cannot read.
  registration register_memory(std::span<std::byte> bytes, memory_location where = {}) {
    require_kind(source_kinds, where, "the loopback transport", "staging memory");
    return registration{bytes, where};
  }

  class receiver {
  public:
    static constexpr memory_kinds destination_kinds = basic_loopback_transport::destination_kinds;
    /// `notice_depth` bounds the notices queued before the receiver awaits them; a sender's
    /// async_notify completes (is acknowledged) once its notice is queued.
    explicit receiver(const executor_type& ex, std::size_t notice_depth = 64)
        : state_(std::make_shared<receiver_state>(ex, notice_depth)) {}

    executor_type get_executor() const noexcept { return state_->notices.get_executor(); }

    std::span<std::byte> allocate(std::size_t bytes) {
      auto& arena = state_->arenas.emplace_back(new std::byte[bytes]());
      return {arena.get(), bytes};
    }

    /// Any host memory of this process can be exposed: an allocated arena's or the caller's
    /// own (adopted) tensors. Throws shardline::error naming the region for another memory
    /// kind (errc::unsupported_memory), a name given twice or an overlap (invalid_argument).
    void expose(exposure e) {
      // In-process memory needs no key: every region's is 0.
      detail::expose_region(state_->table, std::move(e),
                            {"loopback receiver", "the loopback transport", destination_kinds},
                            [](const exposure&) { return 0u; });
    }
    void expose(std::string name, std::span<std::byte> bytes) { expose({std::move(name), bytes}); }

    void admit(admission a) noexcept { state_->admitted = a; }

    const region_table& regions() const noexcept { return state_->table; }

    /// Completion void(std::error_code, notice), see transport_receiver.
    template <class Token>
    auto async_wait_notification(Token&& token) {
      return state_->notices.async_receive(std::forward<Token>(token));
    }

    /// The senders' pending and later operations fail with errc::peer_disconnected.
    void close() noexcept {
      state_->open = false;
      state_->notices.cancel();  // a sender waiting for room (its acknowledgement) learns it now
      state_->notices.close();
    }

  private:
    friend class basic_loopback_transport;
    std::shared_ptr<receiver_state> state_;
  };

  /// Move-only; destroying it closes it (the receiver sees the sender leave, as it would see
  /// a socket close).
  class connection {
  public:
    using executor_type = Executor;
    connection(connection&& o) noexcept
        : executor_(o.executor_), peer_(std::move(o.peer_)), link_(std::move(o.link_)),
          table_(std::move(o.table_)), who_(o.who_),
          open_(std::exchange(o.open_, false)), delay_(o.delay_), wire_rate_(o.wire_rate_),
          wire_free_(o.wire_free_) {}
    connection& operator=(connection&& o) noexcept {
      if (this != &o) {
        close();
        executor_ = o.executor_;
        peer_ = std::move(o.peer_);
        link_ = std::move(o.link_);
        table_ = std::move(o.table_);
        who_ = o.who_;
        open_ = std::exchange(o.open_, false);
        delay_ = o.delay_;
        wire_rate_ = o.wire_rate_;
        wire_free_ = o.wire_free_;
      }
      return *this;
    }
    ~connection() { close(); }

    executor_type get_executor() const noexcept { return executor_; }

    const region_table& remote_regions() const noexcept { return table_; }
    bool is_open() const noexcept { return open_ && peer_ && peer_->open; }
    const sender_identity& identity() const noexcept { return who_; }

    /// Completion signature void(std::error_code). The copy happens during initiation (or
    /// when the modelled link delivers it); the completion is always posted. Either every
    /// request lands or none does.
    template <class Token>
    auto async_write(std::span<const write_request> batch, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [this, batch](auto handler) {
            if (!open_ || !peer_) {
              detail::post_completion(executor_, std::move(handler),
                                      make_error_code(errc::not_connected));
              return;
            }
            if (delay_ == std::chrono::steady_clock::duration::zero() && wire_rate_ <= 0)
              return finish(link_, executor_, std::move(handler), copy(*peer_, batch));
            auto timer = std::make_unique<asio::steady_timer>(executor_, landing_time(batch));
            auto& t = *timer;
            t.async_wait([executor = executor_, peer = peer_, link = link_, handler = std::move(handler),
                          timer = std::move(timer),
                          requests = std::vector<write_request>(batch.begin(), batch.end())](
                             std::error_code) mutable {
              finish(link, executor, std::move(handler), copy(*peer, requests));
            });
          },
          token);
    }

    /// Completion void(std::error_code) once the notice is queued at the receiver (its
    /// acknowledgement); errc::peer_disconnected when the receiver is closed; close() of this
    /// connection completes one still waiting for room with operation_aborted.
    template <class Token>
    auto async_notify(notice_kind kind, std::uint32_t version, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [this, kind, version](auto handler) {
            if (!open_ || !peer_)
              return detail::post_completion(executor_, std::move(handler),
                                             make_error_code(errc::not_connected));
            if (!peer_->open)
              return detail::post_completion(executor_, std::move(handler),
                                             make_error_code(errc::peer_disconnected));
            auto pending = link_->notices.emplace(link_->notices.end());
            // The caller's own cancellation (any type) withdraws a notice still waiting for
            // room: the receiver never sees it, as with shm and verbs. A queued one is sent.
            auto caller_slot = asio::get_associated_cancellation_slot(handler);
            if (caller_slot.is_connected())
              caller_slot.assign([pending](asio::cancellation_type type) {
                if (type == asio::cancellation_type::none) return;
                pending->withdrawn = true;
                pending->signal.emit(asio::cancellation_type::terminal);
              });
            peer_->notices.async_send(
                std::error_code{}, notice{who_.sender, kind, version},
                asio::bind_cancellation_slot(
                    pending->signal.slot(),
                    [handler = std::move(handler), executor = executor_, link = link_, pending,
                     caller_slot](std::error_code ec) mutable {
                      if (caller_slot.is_connected()) caller_slot.clear();
                      if (ec)
                        ec = link->closed || pending->withdrawn ? std::error_code(asio::error::operation_aborted)
                                                                : make_error_code(errc::peer_disconnected);
                      link->notices.erase(pending);
                      detail::post_completion(executor, std::move(handler), ec);
                    }));
          },
          token);
    }

    /// The receiver sees this sender leave (a peer_disconnected notice naming it).
    void close() noexcept {
      if (!open_) return;
      open_ = false;
      link_->closed = true;
      if (peer_) peer_->connected.erase(who_.sender);  // the id may connect again
      // Pending operations complete with an error (operation_aborted), as the concept says.
      for (auto& pending : link_->notices) pending.signal.emit(asio::cancellation_type::terminal);
      // async_send, not try_send: a full queue must not lose the leave (it waits its turn).
      if (peer_ && peer_->open)
        peer_->notices.async_send(make_error_code(errc::peer_disconnected),
                                  notice{who_.sender, notice_kind::abort, 0}, [](std::error_code) {});
    }

    /// From now on each write copies and completes `delay` after its initiation, as a NIC
    /// that reads the source late would: tests use it to prove that the source bytes are
    /// left alone until completion, benchmarks to model wire time. Not cancellable.
    void set_completion_delay(std::chrono::steady_clock::duration delay) noexcept {
      delay_ = delay;
    }

    /// Models a serial link of `bytes_per_second` that costs no CPU, as a NIC's DMA engine:
    /// each batch occupies the link for its bytes / rate after the batches before it, and
    /// lands (is copied) when its turn ends. 0 turns the model off.
    void set_wire_rate(double bytes_per_second) noexcept { wire_rate_ = bytes_per_second; }

  private:
    friend class basic_loopback_transport;
    connection(const executor_type& ex, std::shared_ptr<receiver_state> peer, sender_identity who)
        : executor_(ex), peer_(std::move(peer)), table_(peer_->table), who_(who) {
      peer_->connected.insert(who_.sender);
    }

    // What outlives a moved-from connection and its delayed writes: whether it was closed, and
    // the cancellation of each notice still waiting for room.
    struct pending_notice {
      asio::cancellation_signal signal;  // stops the wait for room in the receiver's queue
      bool withdrawn = false;            // by the caller's cancellation, not by close()
    };
    struct link_state {
      bool closed = false;
      std::list<pending_notice> notices;
    };

    // One post, through post_completion: a handler on this executor (a coroutine typed on it)
    // runs straight from the queue, with no second hop to its own executor.
    template <class Handler>
    static void finish(std::shared_ptr<link_state> link, const executor_type& executor, Handler&& handler,
                       std::error_code result) {
      using handler_type = std::decay_t<Handler>;
      detail::post_completion(
          executor, detail::aborted_if_closed<handler_type, link_state>(std::move(handler), std::move(link)), result);
    }

    // Static, with the peer passed in: a delayed write outlives a moved-from connection.
    static std::error_code copy(receiver_state& peer, std::span<const write_request> batch) {
      if (!peer.open) return make_error_code(errc::peer_disconnected);
      for (const auto& w : batch)  // validate first: nothing half-written
        if (!peer.table.covers(w.remote_address, w.source.size()))
          return make_error_code(errc::region_not_exposed);
      for (const auto& w : batch)
        if (!w.source.empty())
          std::memcpy(reinterpret_cast<void*>(static_cast<std::uintptr_t>(w.remote_address)),
                      w.source.data(), w.source.size());
      return {};
    }

    std::chrono::steady_clock::time_point landing_time(std::span<const write_request> batch) {
      const auto now = std::chrono::steady_clock::now();
      if (wire_rate_ <= 0) return now + delay_;
      double bytes = 0;
      for (const auto& w : batch) bytes += static_cast<double>(w.source.size());
      wire_free_ = std::max(wire_free_, now) + delay_ +
                   std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(bytes / wire_rate_));
      return wire_free_;
    }

    executor_type executor_;
    std::shared_ptr<receiver_state> peer_;
    std::shared_ptr<link_state> link_ = std::make_shared<link_state>();
    region_table table_;
    sender_identity who_;
    bool open_ = true;
    std::chrono::steady_clock::duration delay_{};
    double wire_rate_ = 0;
    std::chrono::steady_clock::time_point wire_free_{};
  };

  /// Connects to a receiver of this process as sender `who`; its region table is copied now.
  /// Throws shardline::error when the receiver refuses `who` (errc::unknown_sender,
  /// errc::plan_mismatch; errc::invalid_argument while another connection of sender
  /// `who.sender` to it is open, as shm and verbs refuse it: once that one is closed or
  /// destroyed, the id connects again) or is closed (errc::not_connected).
  connection connect(receiver& r, sender_identity who = {}) {
    const std::string refused = "loopback connect: sender " + std::to_string(who.sender) + " refused: ";
    if (!r.state_->open)
      throw error(make_error_code(errc::not_connected), "loopback connect: the receiver is closed");
    if (auto ec = r.state_->admitted.check(who)) throw error(ec, refused + ec.message());
    if (r.state_->connected.contains(who.sender))
      throw error(make_error_code(errc::invalid_argument),
                  refused + "a connection with this id to the receiver is still open");
    return connection(executor_, r.state_, who);
  }

private:
  executor_type executor_;
};

using loopback_transport = basic_loopback_transport<>;

static_assert(transport<loopback_transport>);

}  // namespace shardline

template <template <class, class> class Associator, class Handler, class Link, class DefaultCandidate>
struct asio::associator<Associator, shardline::detail::aborted_if_closed<Handler, Link>, DefaultCandidate>
    : Associator<Handler, DefaultCandidate> {
  static typename Associator<Handler, DefaultCandidate>::type get(
      const shardline::detail::aborted_if_closed<Handler, Link>& h,
      const DefaultCandidate& c = DefaultCandidate()) noexcept {
    return Associator<Handler, DefaultCandidate>::get(h.handler(), c);
  }
};
