// shardline/transport/verbs/detail/receiver_state.hpp: the receiver side: arenas and adopted memory,
// the region table, the senders (each with its control socket and QPs) and their notices.
#pragma once

#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/detail/control_link.hpp>
#include <shardline/transport/detail/handshake.hpp>
#include <shardline/transport/detail/erased_op.hpp>
#include <shardline/transport/detail/expose.hpp>
#include <shardline/transport/detail/psk_auth.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/verbs/detail/handles.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/error.hpp>
#include <shardline/transport/verbs/memory_region.hpp>
#include <shardline/transport/verbs/memory_window.hpp>
#include <shardline/transport/verbs/options.hpp>
#include <shardline/transport/verbs/queue_pair.hpp>

#include <asio/associated_cancellation_slot.hpp>
#include <asio/basic_socket_acceptor.hpp>
#include <asio/basic_stream_socket.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>

#include <infiniband/verbs.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <memory>
#include <optional>
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
  using waiter = shardline::detail::erased_op<std::error_code, notice>;
  using waiter_ptr = shardline::detail::op_ptr<waiter>;

  // One sender, from its TCP accept on. Writes land through its QPs; the only work it posts
  // is the binding of its memory windows, whose completions the handshake polls.
  // Its notices and acks are sealed once the handshake proved the key (notice_seal).
  struct peer : shardline::detail::notice_source<socket_type, shardline::detail::notice_seal> {
    explicit peer(const Executor& ex)
        : shardline::detail::notice_source<socket_type, shardline::detail::notice_seal>(socket_type(ex)) {}

    // `count` QPs; `send_wr` binds in flight per QP (1 without windows).
    void init(const std::shared_ptr<device>& dev, std::size_t count, std::uint32_t send_wr = 1) {
      device_ = dev;
      cq.reset(ibv_create_cq(dev->context(), static_cast<int>(count * send_wr), nullptr, nullptr, 0));
      if (!cq)
        throw error(std::error_code(errno, std::system_category()),
                    "verbs receiver: ibv_create_cq on " + dev->name() + " failed");
      send_wr_ = send_wr;
      for (std::size_t i = 0; i < count; ++i) {
        qps.push_back(std::make_unique<queue_pair>(dev, cq.get(), send_wr, 1));
        if (auto ec = qps.back()->to_init(IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE))
          throw error(ec, "verbs receiver: QP RESET->INIT failed: " + ec.message());
      }
    }

    // One window per (registration, QP), unbound yet: keys[r] names registration regs[r].
    void plan_windows(std::vector<std::uint32_t> keys, std::vector<const memory_region*> regs) {
      window_keys_ = std::move(keys);
      window_regs_ = std::move(regs);
      windows.reserve(window_regs_.size() * qps.size());
      for (std::size_t i = 0; i < window_regs_.size() * qps.size(); ++i) windows.emplace_back(device_);
    }

    // Posts the next binds (at most send_wr_ per QP, when none is outstanding) and reaps
    // their completions. True once every window is bound; false with `ec` set for a failure.
    bool bind_step(std::error_code& ec) {
      const std::size_t nq = qps.size(), rows = window_regs_.size();
      if (!cq || windows.size() != rows * nq) {  // released or closed meanwhile
        ec = asio::error::operation_aborted;
        return false;
      }
      if (outstanding_ == 0 && posted_rows_ < rows) {
        const std::size_t c = std::min<std::size_t>(send_wr_, rows - posted_rows_);
        std::vector<ibv_send_wr> chain(c);
        for (std::size_t q = 0; q < nq; ++q) {
          for (std::size_t i = 0; i < c; ++i) {
            const std::size_t r = posted_rows_ + i;
            chain[i] = windows[r * nq + q].bind(*window_regs_[r], r * nq + q);
            chain[i].next = i + 1 < c ? &chain[i + 1] : nullptr;
          }
          ibv_send_wr* bad = nullptr;
          if (const int rc = ibv_post_send(qps[q]->get(), chain.data(), &bad)) {
            ec = std::error_code(rc, std::system_category());
            return false;
          }
          outstanding_ += c;
        }
        posted_rows_ += c;
      }
      ibv_wc wc[16];
      for (int n; outstanding_ > 0 && (n = ibv_poll_cq(cq.get(), 16, wc)) > 0;)
        for (int i = 0; i < n; ++i) {
          --outstanding_;
          if (wc[i].status != IBV_WC_SUCCESS) {
            ec = make_wc_error(wc[i].status);
            return false;
          }
        }
      return posted_rows_ == rows && outstanding_ == 0;
    }

    // What the sender gets once every window is bound: per registration its key, then the
    // rkey of its window on each QP (detail/wire.hpp). Empty without windows.
    std::vector<std::uint32_t> key_rows() const {
      std::vector<std::uint32_t> v;
      const std::size_t nq = qps.size();
      for (std::size_t r = 0; r < window_keys_.size(); ++r) {
        v.push_back(window_keys_[r]);
        for (std::size_t q = 0; q < nq; ++q) v.push_back(windows[r * nq + q].rkey());
      }
      return v;
    }

    // Releases the verbs objects now (its windows first: their rkeys are revoked); the peer
    // itself may live on in a pending handler.
    void release() noexcept {
      windows.clear();
      qps.clear();
      cq.reset();
    }

    std::shared_ptr<device> device_;  // before cq: destroyed after it
    cq_handle cq;
    std::vector<std::unique_ptr<queue_pair>> qps;  // after cq: destroyed first
    std::vector<memory_window> windows;  // [registration * qps + qp]; after qps: destroyed first
    std::vector<std::uint32_t> window_keys_;
    std::vector<const memory_region*> window_regs_;
    std::uint32_t send_wr_ = 1;
    std::size_t posted_rows_ = 0;
    std::size_t outstanding_ = 0;
    bool claimed = false;  // admitted: its id is taken until it leaves
    bool serving = false;  // connected: its notices are read
  };

  receiver_state(const Executor& ex, std::shared_ptr<device> dev, const options& o,
                 const asio::ip::tcp::endpoint& listen, std::size_t notice_depth)
      : ex_(ex), opts_(o), device_(std::move(dev)), acceptor_(ex),
        handshakes_(std::make_shared<handshakes_type>(ex, o.max_pending_handshakes)),
        depth_(notice_depth),
        windows_(o.memory_windows != memory_window_use::off && device_->supports_memory_windows()) {
    acceptor_.open(listen.protocol());
    acceptor_.set_option(asio::socket_base::reuse_address(true));
    acceptor_.bind(listen);
    acceptor_.listen();
  }

  ~receiver_state() {
    // Peers' QPs and CQs go before the memory they may write, even where a pending handler
    // still holds the peer.
    for (auto& p : peers_) p->release();
    peers_.clear();
  }

  acceptor_type& acceptor() noexcept { return acceptor_; }
  using handshakes_type = shardline::detail::handshake_listener<Executor, socket_type>;
  /// Accepted peers' handshakes, run side by side (shardline::detail::accept_peers).
  handshakes_type& handshakes() noexcept { return *handshakes_; }
  const options& opts() const noexcept { return opts_; }
  const std::shared_ptr<device>& dev() const noexcept { return device_; }
  const region_table& table() const noexcept { return table_; }
  bool closed() const noexcept { return closed_; }
  void admit(admission a) noexcept { admitted_ = a; }
  bool memory_windows() const noexcept { return windows_; }

  // Its QPs and, with windows, one unbound window per QP for each registration that an
  // exposed region names (the handshake binds them: peer::bind_step).
  void prepare(peer& p, std::size_t qps) {
    if (!windows_) return p.init(device_, qps);
    std::vector<bool> named(keyed_.size());
    std::vector<std::uint32_t> keys;
    std::vector<const memory_region*> regs;
    for (const auto& r : table_.regions())
      if (r.key && !named[r.key - 1]) {
        named[r.key - 1] = true;
        keys.push_back(r.key);
        regs.push_back(keyed_[r.key - 1]);
      }
    const auto per_qp = std::clamp<std::size_t>(512 / qps, 1, std::max<std::size_t>(regs.size(), 1));
    p.init(device_, qps, static_cast<std::uint32_t>(std::min<std::size_t>(
                             per_qp, static_cast<std::size_t>(std::max(device_->attr().max_qp_wr, 1)))));
    p.plan_windows(std::move(keys), std::move(regs));
  }

  std::span<std::byte> allocate(std::size_t bytes) {
    arena a;
    a.map = mapping(bytes);
    if (!a.map.valid())
      throw error(std::error_code(errno, std::system_category()),
                  "verbs receiver: mmap of a " + std::to_string(bytes) + "-byte arena failed");
    const std::span<std::byte> s(a.map.data(), bytes);
    a.mr = memory_region(device_, s, mr_access());
    arenas_.push_back(std::move(a));
    if (windows_) {
      keyed_.push_back(&arenas_.back().mr);
      arenas_.back().key = static_cast<std::uint32_t>(keyed_.size());
    }
    return s;
  }

  // Inside an arena: its key. Elsewhere: a region of its own over exactly those bytes,
  // remote write only (never remote read), kept until this state goes. The key is the
  // region's rkey; with windows, the registration's number (1, 2, ...), which no QP accepts:
  // each sender gets its windows' rkeys for it.
  void expose(exposure e, memory_kinds kinds) {
    const shardline::detail::exposer who{"verbs receiver", "the verbs transport", kinds};
    std::optional<memory_region> adopted;
    shardline::detail::expose_region(table_, std::move(e), who, [&](const exposure& x) -> std::uint32_t {
      const auto in = std::find_if(arenas_.begin(), arenas_.end(), [&](const arena& a) {
        return a.mr.region().contains(x.bytes.data(), x.bytes.size());
      });
      if (in != arenas_.end()) return windows_ ? in->key : in->mr.rkey();
      if (x.bytes.empty()) return 0;
      try {
        if (x.location.kind == memory_kind::cuda_device)  // only when exposable: the hook is set
          adopted.emplace(opts_.register_device_memory(device_, x.bytes, x.location, mr_access()));
        else
          adopted.emplace(device_, x.bytes, mr_access());
      } catch (const error& failure) {
        throw error(failure.code(), who.region(x.name) + " (" + std::to_string(x.bytes.size()) +
                                        " bytes outside every allocate()d arena) cannot be registered: " +
                                        failure.what());
      }
      return windows_ ? static_cast<std::uint32_t>(keyed_.size() + 1) : adopted->rkey();
    });
    if (!adopted) return;
    adopted_.push_back(std::move(*adopted));
    if (windows_) keyed_.push_back(&adopted_.back());
  }

  // ---- senders ----------------------------------------------------------------------------

  std::shared_ptr<peer> new_peer() {
    peers_.push_back(std::make_shared<peer>(ex_));
    return peers_.back();
  }

  // Why `who` may not connect now, or success. A connection with the same id whose other
  // end is gone (a restarted sender can be back before its predecessor's end was read) is
  // retired now when nothing it sent is left unread; when notices are, `retry` is set: the
  // reads under way will reach its end, after which `who` is welcome.
  std::error_code check(const std::shared_ptr<peer>& p, const sender_identity& who, bool& retry) {
    retry = false;
    if (closed_) return make_error_code(errc::not_connected);
    if (auto ec = admitted_.check(who)) return ec;
    const auto twin = std::find_if(peers_.begin(), peers_.end(), [&](const auto& o) {
      return o != p && o->claimed && o->sender == who.sender;
    });
    if (twin == peers_.end()) return {};
    const auto o = *twin;
    if (o->serving) switch (shardline::detail::probe_predecessor(o->socket.native_handle())) {
        case shardline::detail::predecessor::gone:
          drop(o, make_error_code(errc::peer_disconnected));
          return {};
        case shardline::detail::predecessor::leaving: retry = true; break;
        case shardline::detail::predecessor::alive: break;
      }
    return make_error_code(errc::invalid_argument);  // sender `who` is already connected
  }

  void claim(const std::shared_ptr<peer>& p, std::uint32_t sender) {
    p->sender = sender;
    p->claimed = true;
  }

  // The handshake failed or was refused: the peer goes, its id with it.
  void forget(const std::shared_ptr<peer>& p) {
    std::error_code ignored;
    p->socket.close(ignored);
    p->release();
    p->claimed = false;
    const auto it = std::find(peers_.begin(), peers_.end(), p);
    if (it != peers_.end()) peers_.erase(it);
  }

  // The handshake is done: from now on its notices are read.
  void serve(const std::shared_ptr<peer>& p) {
    p->serving = true;
    shardline::detail::serve_notices(this->weak_from_this(), p);
  }

  // ---- what shardline::detail::serve_notices asks of its listener

  bool serving(const peer& p) const noexcept { return !closed_ && p.serving; }

  // Handed to a waiter or queued: echoed now when this process holds it (taken, or queued
  // within depth_); past depth_ once a wait takes it.
  bool notice_arrived(const std::shared_ptr<peer>& p, notice n) {
    if (!waiters_.empty()) {
      shardline::detail::complete_op(pop_waiter(), std::error_code{}, n);
      return true;
    }
    if (notices_.size() >= depth_) {
      notices_.push_back({{}, n, p});
      return false;
    }
    notices_.push_back({{}, n, nullptr});
    return true;
  }

  void sender_left(const std::shared_ptr<peer>& p, std::error_code why) { drop(p, why); }

  // ---- notices ----------------------------------------------------------------------------

  template <class Handler>
  void start_wait(Handler&& handler) {
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto h = shardline::detail::make_op<waiter>(std::forward<Handler>(handler), ex_);
    if (closed_) return shardline::detail::complete_op(std::move(h), make_error_code(errc::not_connected), notice{});
    if (!notices_.empty()) {
      auto e = std::move(notices_.front());
      notices_.pop_front();
      shardline::detail::complete_op(std::move(h), e.ec, e.n);
      if (e.owed) ack(e.owed);
      return ack_within_depth();
    }
    waiter* raw = h.get();
    waiters_.push_back({std::move(h), slot});
    if (slot.is_connected())
      slot.template emplace<canceller>(canceller{this->weak_from_this(), raw});
  }

  struct canceller {
    std::weak_ptr<receiver_state> state;
    waiter* w;
    void operator()(asio::cancellation_type type) const {
      if (type == asio::cancellation_type::none) return;
      if (auto s = state.lock()) s->cancel(w);
    }
  };

  void cancel(waiter* w) {
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it)
      if (it->handler.get() == w) {
        auto h = std::move(it->handler);
        it->slot.clear();
        waiters_.erase(it);
        shardline::detail::complete_op(std::move(h), asio::error::operation_aborted, notice{});
        return;
      }
  }

  void close() noexcept {
    if (closed_) return;
    closed_ = true;
    std::error_code ignored;
    acceptor_.close(ignored);
    handshakes_->close();
    for (auto& p : peers_) {
      p->serving = false;
      p->windows.clear();  // revoked
      for (auto& q : p->qps) q->to_error();
      p->socket.close(ignored);
    }
    notices_.clear();
    while (!waiters_.empty())
      shardline::detail::complete_op(pop_waiter(), asio::error::operation_aborted, notice{});
  }

private:
  // With windows, memory is remote-writable only through them.
  int mr_access() const noexcept {
    return IBV_ACCESS_LOCAL_WRITE | (windows_ ? IBV_ACCESS_MW_BIND : IBV_ACCESS_REMOTE_WRITE);
  }

  void ack(std::shared_ptr<peer> p) {
    if (!p->serving) return;
    shardline::detail::acknowledge_notice(this->weak_from_this(), std::move(p));
  }

  // A notice taken from the queue made room: those now within depth_ are held here.
  void ack_within_depth() {
    for (std::size_t i = 0; i < notices_.size() && i < depth_; ++i)
      if (auto p = std::move(notices_[i].owed)) ack(std::move(p));
  }

  // A sender left (or spoke garbage): its QPs go now, and the waiters learn it after every
  // notice it sent before.
  void drop(const std::shared_ptr<peer>& p, std::error_code why) {
    p->serving = false;
    forget(p);
    const notice left{p->sender, notice_kind::abort, 0};
    if (!waiters_.empty()) return shardline::detail::complete_op(pop_waiter(), why, left);
    notices_.push_back({why, left, nullptr});
  }

  struct arena {
    mapping map;         // first: unmapped after the MR is deregistered
    memory_region mr;
    std::uint32_t key = 0;  // with windows: its number in keyed_
  };
  struct pending {
    waiter_ptr handler;
    asio::cancellation_slot slot;
  };
  struct entry {
    std::error_code ec;
    notice n;
    std::shared_ptr<peer> owed;  // the sender whose ack waits until this one is held
  };

  waiter_ptr pop_waiter() {
    auto p = std::move(waiters_.front());
    waiters_.pop_front();
    if (p.slot.is_connected()) p.slot.clear();
    return std::move(p.handler);
  }

  Executor ex_;
  options opts_;
  std::shared_ptr<device> device_;
  acceptor_type acceptor_;
  std::shared_ptr<handshakes_type> handshakes_;
  std::deque<arena> arenas_;             // deques: keyed_ points into them
  std::deque<memory_region> adopted_;
  std::vector<const memory_region*> keyed_;  // with windows: registration key k is keyed_[k - 1]
  region_table table_;
  admission admitted_;
  std::vector<std::shared_ptr<peer>> peers_;  // last: destroyed first (and cleared earlier)
  std::deque<entry> notices_;
  std::deque<pending> waiters_;
  std::size_t depth_;
  bool windows_;
  bool closed_ = false;
};

}  // namespace shardline::verbs::detail
