// shardline/verbs/detail/receiver_state.hpp: the receiver side: arenas, region table,
// the accepted peers (each with its CQ and QPs) and the notifications they delivered.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/verbs/completion_queue.hpp>
#include <shardline/verbs/detail/handler.hpp>
#include <shardline/verbs/detail/handles.hpp>
#include <shardline/verbs/device.hpp>
#include <shardline/verbs/error.hpp>
#include <shardline/verbs/memory_region.hpp>
#include <shardline/verbs/options.hpp>
#include <shardline/verbs/queue_pair.hpp>

#include <asio/basic_socket_acceptor.hpp>
#include <asio/basic_stream_socket.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/ip/tcp.hpp>

#include <arpa/inet.h>
#include <infiniband/verbs.h>

#include <deque>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace shardline::verbs::detail {

template <poll_mode Mode, class Executor>
class receiver_state final
    : public std::enable_shared_from_this<receiver_state<Mode, Executor>> {
public:
  using socket_type = asio::basic_stream_socket<asio::ip::tcp, Executor>;
  using acceptor_type = asio::basic_socket_acceptor<asio::ip::tcp, Executor>;
  using waiter = erased_handler<std::error_code, std::uint32_t>;

  // One accepted sender.
  class peer final : public cq_consumer, public std::enable_shared_from_this<peer> {
  public:
    peer(receiver_state* owner, const Executor& ex) : owner_(owner), socket(ex) {}

    void init(const options& o, std::shared_ptr<device> dev, std::size_t qps) {
      cq = std::make_unique<completion_queue<Mode, Executor>>(
          socket.get_executor(), *dev,
          static_cast<int>(std::max<std::size_t>(o.cq_entries, qps * o.max_send_wr)), o);
      cq->set_consumer(this->weak_from_this(), this);
      for (std::size_t i = 0; i < qps; ++i) {
        this->qps.push_back(std::make_unique<queue_pair>(dev, cq->get(), 1, o.max_send_wr));
        if (auto ec = this->qps.back()->to_init(IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE))
          throw error(ec, "verbs receiver: QP RESET->INIT failed: " + ec.message());
        // WRITE WITH IMM consumes a receive: zero-length ones, posted before RTR.
        for (std::uint32_t r = 0; r < o.max_send_wr; ++r)
          if (auto ec = post_recv(*this->qps.back()))
            throw error(ec, "verbs receiver: ibv_post_recv failed: " + ec.message());
      }
    }

    static std::error_code post_recv(queue_pair& q) {
      ibv_recv_wr wr{};
      wr.wr_id = reinterpret_cast<std::uintptr_t>(&q);
      ibv_recv_wr* bad = nullptr;
      const int rc = ibv_post_recv(q.get(), &wr, &bad);
      return rc ? std::error_code(rc, std::system_category()) : std::error_code{};
    }

    bool has_work() const noexcept override { return owner_->has_waiters(); }
    void on_completion(const ibv_wc& wc) override {
      auto* q = reinterpret_cast<queue_pair*>(static_cast<std::uintptr_t>(wc.wr_id));
      if (wc.status == IBV_WC_SUCCESS) {
        if (wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM)
          owner_->notifications_.emplace_back(std::error_code{}, ntohl(wc.imm_data));
        if (q && !owner_->closed_) (void)post_recv(*q);
      } else if (wc.status != IBV_WC_WR_FLUSH_ERR) {
        owner_->notifications_.emplace_back(make_wc_error(wc.status), 0);
      }
    }
    void after_drain() override { owner_->deliver(); }

    void start_watch() {
      if (watch_pending || !socket.is_open()) return;
      watch_pending = true;
      socket.async_read_some(asio::buffer(&byte, 1),
                             [w = this->weak_from_this(), this](std::error_code ec, std::size_t) {
                               auto keep = w.lock();
                               if (!keep) return;
                               watch_pending = false;
                               if (!ec || ec == asio::error::operation_aborted) {
                                 if (has_work() && !owner_->closed_) start_watch();
                                 return;
                               }
                               // EOF: the sender is gone. What it committed before
                               // still comes first.
                               lost = true;
                               cq->drain();
                               owner_->deliver();
                             });
    }

    receiver_state* owner_;
    socket_type socket;
    std::unique_ptr<completion_queue<Mode, Executor>> cq;
    std::vector<std::unique_ptr<queue_pair>> qps;  // after cq: destroyed first
    bool lost = false;
    bool watch_pending = false;
    char byte = 0;
  };

  receiver_state(const Executor& ex, std::shared_ptr<device> dev, const options& o,
                 const asio::ip::tcp::endpoint& listen)
      : ex_(ex), opts_(o), device_(std::move(dev)), acceptor_(ex) {
    acceptor_.open(listen.protocol());
    acceptor_.set_option(asio::socket_base::reuse_address(true));
    acceptor_.bind(listen);
    acceptor_.listen();
  }

  ~receiver_state() {
    // Peers (QPs, CQs) go before the arenas they may write.
    peers_.clear();
  }

  acceptor_type& acceptor() noexcept { return acceptor_; }
  const options& opts() const noexcept { return opts_; }
  const std::shared_ptr<device>& dev() const noexcept { return device_; }
  const region_table& table() const noexcept { return table_; }
  bool closed() const noexcept { return closed_; }

  std::span<std::byte> allocate(std::size_t bytes) {
    arena a;
    a.map = mapping(bytes);
    if (!a.map.valid())
      throw error(std::error_code(errno, std::system_category()),
                  "verbs receiver: mmap of a " + std::to_string(bytes) + "-byte arena failed");
    const std::span<std::byte> s(a.map.data(), bytes);
    a.mr = memory_region(device_, s, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    arenas_.push_back(std::move(a));
    return s;
  }

  void expose(std::string name, std::span<std::byte> bytes) {
    for (auto& a : arenas_) {
      if (a.mr.region().contains(bytes.data(), bytes.size())) {
        if (table_.find(name))
          throw error(make_error_code(errc::invalid_argument),
                      "verbs receiver: region '" + name + "' is already exposed");
        table_.add({std::move(name), reinterpret_cast<std::uintptr_t>(bytes.data()),
                    bytes.size(), a.mr.rkey()});
        return;
      }
    }
    throw error(make_error_code(errc::invalid_argument),
                "verbs receiver: region '" + name +
                    "' is not inside an arena returned by allocate()");
  }

  void add_peer(std::shared_ptr<peer> p) {
    peers_.push_back(std::move(p));
    if (has_waiters()) {
      peers_.back()->cq->kick();
      peers_.back()->start_watch();
    }
  }

  bool has_waiters() const noexcept { return !waiters_.empty(); }

  struct canceller {
    std::weak_ptr<receiver_state> state;
    waiter* w;
    void operator()(asio::cancellation_type type) const {
      if ((type & asio::cancellation_type::terminal) == asio::cancellation_type::none) return;
      if (auto s = state.lock()) s->cancel(w);
    }
  };

  template <class Handler>
  void start_wait(Handler&& handler) {
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto h = erase_handler<std::error_code, std::uint32_t>(std::forward<Handler>(handler), ex_);
    if (closed_) return h->complete(make_error_code(errc::not_connected), 0);
    waiter* raw = h.get();
    waiters_.push_back({std::move(h), slot});
    if (slot.is_connected())
      slot.template emplace<canceller>(canceller{this->weak_from_this(), raw});
    if (!notifications_.empty()) return deliver();
    for (auto& p : peers_) {
      p->cq->kick();
      p->start_watch();
    }
    deliver();  // a peer already lost and nothing queued
  }

  void deliver() {
    while (!waiters_.empty() && !notifications_.empty()) {
      auto [ec, v] = notifications_.front();
      notifications_.pop_front();
      pop_waiter()->complete(ec, v);
    }
    bool lost = false;
    for (auto& p : peers_) lost |= p->lost;
    if (lost && notifications_.empty())
      while (!waiters_.empty())
        pop_waiter()->complete(make_error_code(errc::peer_disconnected), 0);
    if (waiters_.empty()) {
      std::error_code ignored;
      for (auto& p : peers_)
        if (p->watch_pending) p->socket.cancel(ignored);
    }
  }

  void cancel(waiter* w) {
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it)
      if (it->handler.get() == w) {
        auto h = std::move(it->handler);
        it->slot.clear();
        waiters_.erase(it);
        h->complete(asio::error::operation_aborted, 0);
        return;
      }
  }

  void close() noexcept {
    if (closed_) return;
    closed_ = true;
    std::error_code ignored;
    acceptor_.close(ignored);
    for (auto& p : peers_) {
      for (auto& q : p->qps) q->to_error();
      p->socket.close(ignored);
    }
    while (!waiters_.empty()) pop_waiter()->complete(asio::error::operation_aborted, 0);
  }

private:
  struct arena {
    mapping map;         // first: unmapped after the MR is deregistered
    memory_region mr;
  };
  struct pending {
    std::unique_ptr<waiter> handler;
    asio::cancellation_slot slot;
  };

  std::unique_ptr<waiter> pop_waiter() {
    auto p = std::move(waiters_.front());
    waiters_.pop_front();
    if (p.slot.is_connected()) p.slot.clear();
    return std::move(p.handler);
  }

  Executor ex_;
  options opts_;
  std::shared_ptr<device> device_;
  acceptor_type acceptor_;
  std::vector<arena> arenas_;
  region_table table_;
  std::vector<std::shared_ptr<peer>> peers_;
  std::deque<std::pair<std::error_code, std::uint32_t>> notifications_;
  std::deque<pending> waiters_;
  bool closed_ = false;
};

}  // namespace shardline::verbs::detail
