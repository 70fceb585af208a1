// shardline/loopback_transport.hpp: an in-process transport for testing pipeline logic.
// It copies with memcpy on the calling thread; it is never a stand-in for verbs or shm.
#pragma once

#include <shardline/detail/completion.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace shardline {

/// In-process transport. Remote addresses are plain pointers into the receiver's arenas.
///
/// Thread safety: distinct objects safe; shared objects unsafe. All objects of one
/// transport must be used from the one executor's thread.
template <class Executor = asio::any_io_executor>
class basic_loopback_transport {
  using notification_channel =
      asio::experimental::channel<Executor, void(std::error_code, std::uint32_t)>;

  struct receiver_state {
    explicit receiver_state(const Executor& ex, std::size_t depth) : notifications(ex, depth) {}
    std::vector<std::unique_ptr<std::byte[]>> arenas;
    std::vector<std::span<std::byte>> arena_spans;
    region_table table;
    notification_channel notifications;
    bool open = true;
  };

public:
  using executor_type = Executor;

  explicit basic_loopback_transport(const executor_type& ex) : executor_(ex) {}

  executor_type get_executor() const noexcept { return executor_; }

  /// Local memory needs no registration in-process; the type exists for the concept.
  using registration = unregistered_memory;

  registration register_memory(std::span<std::byte> bytes) {
    return registration{bytes};
  }

  class receiver {
  public:
    /// `notification_depth` bounds commits queued before the receiver awaits them.
    explicit receiver(const executor_type& ex, std::size_t notification_depth = 64)
        : state_(std::make_shared<receiver_state>(ex, notification_depth)) {}

    executor_type get_executor() const noexcept { return state_->notifications.get_executor(); }

    std::span<std::byte> allocate(std::size_t bytes) {
      auto& arena = state_->arenas.emplace_back(new std::byte[bytes]());
      return state_->arena_spans.emplace_back(arena.get(), bytes);
    }

    void expose(std::string name, std::span<std::byte> bytes) {
      bool inside = false;
      for (auto a : state_->arena_spans)
        inside |= local_region{a.data(), a.size(), 0}.contains(bytes.data(), bytes.size());
      if (!inside)
        throw error(make_error_code(errc::invalid_argument),
                    "loopback receiver: region '" + name + "' is not inside an allocated arena");
      state_->table.add(
          {std::move(name), reinterpret_cast<std::uintptr_t>(bytes.data()), bytes.size(), 0});
    }

    const region_table& regions() const noexcept { return state_->table; }

    template <class Token>
    auto async_wait_notification(Token&& token) {
      return state_->notifications.async_receive(std::forward<Token>(token));
    }

    /// The peer's pending and later writes fail with errc::peer_disconnected.
    void close() noexcept {
      state_->open = false;
      state_->notifications.close();
    }

  private:
    friend class basic_loopback_transport;
    std::shared_ptr<receiver_state> state_;
  };

  class connection {
  public:
    using executor_type = Executor;
    executor_type get_executor() const noexcept { return executor_; }

    const region_table& remote_regions() const noexcept { return table_; }
    bool is_open() const noexcept { return open_ && peer_ && peer_->open; }

    /// Completion signature void(std::error_code). The copy happens during initiation;
    /// the completion is always posted. Either every request lands or none does.
    template <class Token>
    auto async_write(std::span<const write_request> batch, Token&& token) {
      return async_write_notify_impl(batch, false, 0, std::forward<Token>(token));
    }

    template <class Token>
    auto async_write_notify(std::span<const write_request> batch, std::uint32_t notification,
                            Token&& token) {
      return async_write_notify_impl(batch, true, notification, std::forward<Token>(token));
    }

    void close() noexcept { open_ = false; }

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
    connection(const executor_type& ex, std::shared_ptr<receiver_state> peer)
        : executor_(ex), peer_(std::move(peer)), table_(peer_->table) {}

    // Static, with the peer passed in: a delayed write outlives a moved-from connection.
    static std::error_code copy(receiver_state& peer, std::span<const write_request> batch,
                                bool notify, std::uint32_t value) {
      if (!peer.open) return make_error_code(errc::peer_disconnected);
      for (const auto& w : batch)  // validate first: nothing half-written
        if (!peer.table.find(w.remote_address, w.source.size()))
          return make_error_code(errc::region_not_exposed);
      for (const auto& w : batch)
        if (!w.source.empty())
          std::memcpy(reinterpret_cast<void*>(static_cast<std::uintptr_t>(w.remote_address)),
                      w.source.data(), w.source.size());
      if (notify && !peer.notifications.try_send(std::error_code{}, value))
        return make_error_code(errc::peer_disconnected);
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

    template <class Token>
    auto async_write_notify_impl(std::span<const write_request> batch, bool notify,
                                 std::uint32_t value, Token&& token) {
      return asio::async_initiate<Token, void(std::error_code)>(
          [this, batch, notify, value](auto handler) {
            if (!open_) {
              detail::post_completion(executor_, std::move(handler),
                                      make_error_code(errc::not_connected));
              return;
            }
            if (delay_ == std::chrono::steady_clock::duration::zero() && wire_rate_ <= 0) {
              detail::post_completion(executor_, std::move(handler),
                                      copy(*peer_, batch, notify, value));
              return;
            }
            auto timer = std::make_unique<asio::steady_timer>(executor_, landing_time(batch));
            auto& t = *timer;
            t.async_wait([executor = executor_, peer = peer_, handler = std::move(handler),
                          timer = std::move(timer),
                          requests = std::vector<write_request>(batch.begin(), batch.end()),
                          notify, value](std::error_code) mutable {
              detail::post_completion(executor, std::move(handler),
                                      copy(*peer, requests, notify, value));
            });
          },
          token);
    }

    executor_type executor_;
    std::shared_ptr<receiver_state> peer_;
    region_table table_;
    bool open_ = true;
    std::chrono::steady_clock::duration delay_{};
    double wire_rate_ = 0;
    std::chrono::steady_clock::time_point wire_free_{};
  };

  /// Connects to a receiver of this process; its region table is copied now.
  connection connect(receiver& r) { return connection(executor_, r.state_); }

private:
  executor_type executor_;
};

using loopback_transport = basic_loopback_transport<>;

static_assert(transport<loopback_transport>);

}  // namespace shardline
