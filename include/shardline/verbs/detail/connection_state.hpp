// shardline/verbs/detail/connection_state.hpp: the sender side of one peer: its CQ, QPs,
// control socket and the write operations in flight.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/verbs/completion_queue.hpp>
#include <shardline/verbs/detail/handler.hpp>
#include <shardline/verbs/device.hpp>
#include <shardline/verbs/error.hpp>
#include <shardline/verbs/options.hpp>
#include <shardline/verbs/queue_pair.hpp>

#include <asio/basic_stream_socket.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>

#include <arpa/inet.h>
#include <infiniband/verbs.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <vector>

namespace shardline::verbs::detail {

struct write_op;

// One work request. wr_id points here: into the operation's state, never at a
// per-WR heap callback. `gen` is the operation's generation when posted.
struct segment {
  write_op* op = nullptr;
  std::uint64_t gen = 0;
  std::uint64_t local = 0;
  std::uint32_t length = 0;
  std::uint32_t lkey = 0;
  std::uint64_t remote = 0;
  std::uint32_t rkey = 0;
  std::uint32_t qp = 0;
  bool imm = false;
  bool in_flight = false;
};

// Pooled: recycled (generation bumped) only once every segment has retired, so a
// completion can never land on the next version's operation.
struct write_op {
  std::uint64_t gen = 1;
  std::unique_ptr<erased_handler<std::error_code>> handler;
  asio::cancellation_slot slot;
  std::vector<segment> segs;
  std::size_t data = 0;               // segs[0, data) are data, then maybe the imm one
  std::vector<std::size_t> cursor;    // per QP: the next data segment to post on it
  std::size_t posted = 0;
  std::size_t remaining = 0;          // segments not yet retired
  bool notify = false;
  bool imm_posted = false;
  std::uint32_t notification = 0;
  std::error_code ec;
};

template <poll_mode Mode, class Executor>
class connection_state final
    : public cq_consumer,
      public std::enable_shared_from_this<connection_state<Mode, Executor>> {
public:
  using socket_type = asio::basic_stream_socket<asio::ip::tcp, Executor>;

  connection_state(const Executor& ex, std::shared_ptr<device> dev, const options& o)
      : ex_(ex), opts_(o), device_(std::move(dev)), socket_(ex) {
    if (opts_.queue_pairs == 0 || opts_.queue_pairs > 64)
      throw error(make_error_code(errc::invalid_argument),
                  "verbs options: queue_pairs must be 1..64, not " +
                      std::to_string(opts_.queue_pairs));
    if (opts_.max_send_wr == 0 || opts_.signal_every == 0 || opts_.max_wr_per_post == 0)
      throw error(make_error_code(errc::invalid_argument),
                  "verbs options: max_send_wr, signal_every and max_wr_per_post must be > 0");
    max_write_ = device_->port_attr().max_msg_sz;
    if (opts_.max_write_bytes && opts_.max_write_bytes < max_write_)
      max_write_ = opts_.max_write_bytes;
    if (max_write_ == 0 || max_write_ > 0x80000000u) max_write_ = 0x80000000u;
  }

  // Called once owned by a shared_ptr (the CQ's handlers hold weak references to it).
  void init() {
    cq_ = std::make_unique<completion_queue<Mode, Executor>>(
        ex_, *device_, static_cast<int>(opts_.cq_entries), opts_);
    cq_->set_consumer(this->weak_from_this(), this);
    cq_budget_ = static_cast<std::size_t>(std::min<int>(cq_->capacity(),
                                                        static_cast<int>(opts_.cq_entries)));
    for (std::size_t i = 0; i < opts_.queue_pairs; ++i) {
      qps_.push_back(std::make_unique<queue_pair>(device_, cq_->get(), opts_.max_send_wr, 1));
      if (auto ec = qps_.back()->to_init(0))
        throw error(ec, "verbs: QP RESET->INIT failed: " + ec.message());
    }
    rings_.resize(qps_.size());
    const std::size_t chain = std::min<std::size_t>(opts_.max_wr_per_post, max_chain);
    wrs_.resize(chain);
    sges_.resize(chain);
  }

  socket_type& socket() noexcept { return socket_; }
  std::vector<qp_endpoint> endpoints() const {
    std::vector<qp_endpoint> v;
    for (auto& q : qps_) v.push_back(q->local());
    return v;
  }
  const device& dev() const noexcept { return *device_; }
  std::size_t max_write() const noexcept { return max_write_; }

  std::error_code connect_qps(const ibv_gid& gid, const std::vector<qp_endpoint>& remote) {
    for (std::size_t i = 0; i < qps_.size(); ++i)
      if (auto ec = qps_[i]->connect(gid, remote[i], opts_)) return ec;
    return {};
  }

  region_table table;

  bool is_open() const noexcept { return !failed_ && !closed_ && !peer_gone_; }

  template <class Handler>
  void start_write(std::span<const write_request> batch, bool notify, std::uint32_t value,
                   Handler&& handler) {
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto h = erase_handler<std::error_code>(std::forward<Handler>(handler), ex_);
    if (closed_) return h->complete(make_error_code(errc::not_connected));
    if (peer_gone_) return h->complete(make_error_code(errc::peer_disconnected));
    if (failed_) return h->complete(make_error_code(errc::connection_failed));

    write_op* op = acquire();
    const std::size_t n = qps_.size();
    for (const auto& w : batch) {
      for (std::size_t off = 0; off < w.source.size(); off += max_write_) {
        segment s;
        s.op = op;
        s.local = reinterpret_cast<std::uintptr_t>(w.source.data()) + off;
        s.length = static_cast<std::uint32_t>(std::min<std::size_t>(max_write_,
                                                                    w.source.size() - off));
        s.lkey = w.source_key;
        s.remote = w.remote_address + off;
        s.rkey = w.remote_key;
        s.qp = static_cast<std::uint32_t>(op->segs.size() % n);
        op->segs.push_back(s);
      }
    }
    op->data = op->segs.size();
    if (notify) {
      segment s;
      s.op = op;
      s.qp = 0;
      s.imm = true;
      op->segs.push_back(s);
    }
    op->notify = notify;
    op->notification = value;
    op->remaining = op->segs.size();
    op->cursor.assign(n, 0);
    for (std::size_t q = 0; q < n; ++q) op->cursor[q] = q;
    op->handler = std::move(h);
    active_.push_back(op);
    if (op->remaining == 0) return finish(op);
    if (slot.is_connected()) {
      op->slot = slot;
      slot.template emplace<canceller>(canceller{this->weak_from_this(), op, op->gen});
    }

    if (active_.size() == 1) {
      keep_ = this->shared_from_this();  // alive while WRs may still complete
      start_watch();
    }
    pump();
    if (!active_.empty()) cq_->kick();
  }

  // Per-operation cancellation: terminal only, because the only way to stop posted
  // WRs is to move the QPs to ERR, which ends the connection.
  struct canceller {
    std::weak_ptr<connection_state> state;
    write_op* op;
    std::uint64_t gen;
    void operator()(asio::cancellation_type type) const {
      if ((type & asio::cancellation_type::terminal) == asio::cancellation_type::none) return;
      if (auto s = state.lock()) s->cancel(op, gen);
    }
  };

  void cancel(write_op* op, std::uint64_t gen) {
    if (op->gen != gen || !op->handler) return;
    fail(asio::error::operation_aborted, false);
  }

  void close() noexcept {
    if (closed_) return;
    closed_ = true;
    fail(asio::error::operation_aborted, false);
    std::error_code ignored;
    socket_.close(ignored);
  }

  // cq_consumer
  bool has_work() const noexcept override { return !active_.empty(); }

  void on_completion(const ibv_wc& wc) override {
    auto* s = reinterpret_cast<segment*>(static_cast<std::uintptr_t>(wc.wr_id));
    // Both checks hold by construction; they keep a stray completion from touching the
    // wrong version.
    if (!s || !s->in_flight || s->gen != s->op->gen || s->qp >= rings_.size()) return;
    auto& ring = rings_[s->qp];
    // RC completes a QP's WRs in order: a signalled success retires every unsignalled
    // WR before it; an error names its WR exactly (errors are always reported).
    while (!ring.empty()) {
      segment* f = ring.front();
      ring.pop_front();
      --cq_used_;
      const bool hit = f == s;
      retire(*f, hit ? wc.status : IBV_WC_SUCCESS);
      if (hit) break;
    }
  }

  void after_drain() override { pump(); }

private:
  write_op* acquire() {
    if (free_.empty()) {
      pool_.push_back(std::make_unique<write_op>());
      free_.push_back(pool_.back().get());
    }
    write_op* op = free_.back();
    free_.pop_back();
    op->segs.clear();
    op->posted = 0;
    op->imm_posted = false;
    op->ec.clear();
    return op;
  }

  void retire(segment& s, ibv_wc_status status) {
    s.in_flight = false;
    write_op* op = s.op;
    --op->remaining;
    if (status != IBV_WC_SUCCESS && !op->ec)
      op->ec = (failed_ && !cause_from_wc_) ? cause_ : make_wc_error(status);
    if (op->remaining == 0) finish(op);
    if (status != IBV_WC_SUCCESS && !failed_) fail(make_wc_error(status), true);
  }

  void finish(write_op* op) {
    if (!op->handler) return;
    active_.erase(std::find(active_.begin(), active_.end(), op));
    op->slot.clear();
    op->slot = {};
    auto h = std::move(op->handler);
    ++op->gen;
    free_.push_back(op);
    h->complete(op->ec);
    if (active_.empty()) {
      std::error_code ignored;
      if (watch_pending_) socket_.cancel(ignored);
      keep_.reset();  // every caller holds its own reference
    }
  }

  void fail(std::error_code cause, bool from_wc) {
    if (failed_) return;
    failed_ = true;
    cause_ = cause;
    cause_from_wc_ = from_wc;
    for (auto& q : qps_) q->to_error();  // outstanding WRs flush
    auto snapshot = active_;
    for (write_op* op : snapshot) {
      const std::size_t unposted = op->segs.size() - op->posted;
      if (unposted) {
        op->posted = op->segs.size();
        op->remaining -= unposted;
        if (!op->ec) op->ec = from_wc ? make_error_code(errc::connection_failed) : cause;
      }
      if (op->remaining == 0) finish(op);
    }
    if (!active_.empty()) cq_->kick();
  }

  void start_watch() {
    if (watch_pending_ || !socket_.is_open()) return;
    watch_pending_ = true;
    socket_.async_read_some(
        asio::buffer(&watch_byte_, 1),
        [w = this->weak_from_this(), this](std::error_code ec, std::size_t) {
          auto keep = w.lock();
          if (!keep) return;
          watch_pending_ = false;
          if (!ec || (ec == asio::error::operation_aborted && !closed_)) {
            if (has_work()) start_watch();
            return;
          }
          if (closed_) return;
          // The receiver closed its control connection (or died): its QPs are gone,
          // so ours go to ERR and everything outstanding flushes now rather than after
          // the retry timeout.
          peer_gone_ = true;
          if (has_work()) fail(make_error_code(errc::peer_disconnected), false);
        });
  }

  bool imm_ready(const write_op* op) const noexcept {
    if (qps_.size() == 1) return op->cursor[0] >= op->data;
    // Other QPs are not ordered with QP 0: the commit waits until this batch (and every
    // earlier one) has completed, i.e. is visible at the receiver.
    return op->remaining == 1 && active_.front() == op;
  }

  void pump() {
    if (failed_ || pumping_) return;
    pumping_ = true;
    const std::size_t n = qps_.size();
    bool more = false;
    for (std::size_t q = 0; q < n && !failed_; ++q) {
      auto& ring = rings_[q];
      std::size_t count = 0;
      bool blocked = false;
      auto room = [&] {
        return count < wrs_.size() && ring.size() + count < opts_.max_send_wr &&
               cq_used_ + count < cq_budget_;
      };
      for (write_op* op : active_) {
        auto& c = op->cursor[q];
        while (c < op->data) {
          if (!room()) {
            blocked = true;
            break;
          }
          add(count++, op->segs[c], c + n >= op->data);
          c += n;
        }
        if (blocked) break;
        if (q == 0 && op->notify && !op->imm_posted && imm_ready(op)) {
          if (!room()) {
            blocked = true;
            break;
          }
          add(count++, op->segs.back(), true);
          op->imm_posted = true;
        }
      }
      if (count) post(q, count);
      if (blocked && count == wrs_.size()) more = true;
    }
    pumping_ = false;
    if (more && !pump_pending_) {
      // Bounded work per turn: a huge batch cannot keep the loop from other handlers.
      pump_pending_ = true;
      asio::post(ex_, [w = this->weak_from_this(), this] {
        auto keep = w.lock();
        if (!keep) return;
        pump_pending_ = false;
        pump();
      });
    }
  }

  void add(std::size_t i, segment& s, bool last_of_op_on_qp) {
    s.gen = s.op->gen;
    auto& wr = wrs_[i];
    wr = {};
    wr.wr_id = reinterpret_cast<std::uintptr_t>(&s);
    if (s.length) {
      sges_[i] = {s.local, s.length, s.lkey};
      wr.sg_list = &sges_[i];
      wr.num_sge = 1;
    }
    wr.opcode = s.imm ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE;
    if (s.imm) wr.imm_data = htonl(s.op->notification);
    wr.wr.rdma.remote_addr = s.remote;
    wr.wr.rdma.rkey = s.rkey;
    if (last_of_op_on_qp) wr.send_flags = IBV_SEND_SIGNALED;
    chain_[i] = &s;
  }

  void post(std::size_t q, std::size_t count) {
    auto& unsignalled = unsignalled_[q];
    for (std::size_t i = 0; i < count; ++i) {
      auto& wr = wrs_[i];
      wr.next = i + 1 < count ? &wrs_[i + 1] : nullptr;
      // Selective signalling: every signal_every-th, the op's last on this QP, and the
      // chain's last (so every posted WR is covered by a later signalled one).
      if (++unsignalled >= opts_.signal_every || i + 1 == count)
        wr.send_flags |= IBV_SEND_SIGNALED;
      if (wr.send_flags & IBV_SEND_SIGNALED) unsignalled = 0;
    }
    ibv_send_wr* bad = nullptr;
    const int rc = ibv_post_send(qps_[q]->get(), wrs_.data(), &bad);
    const std::size_t ok = rc ? static_cast<std::size_t>(bad - wrs_.data()) : count;
    for (std::size_t i = 0; i < ok; ++i) {
      chain_[i]->in_flight = true;
      ++chain_[i]->op->posted;
      rings_[q].push_back(chain_[i]);
      ++cq_used_;
    }
    if (rc) {
      write_op* op = chain_[ok]->op;
      const std::error_code ec(rc, std::system_category());
      if (!op->ec) op->ec = ec;
      fail(ec, false);
    }
  }

  Executor ex_;
  options opts_;
  std::shared_ptr<device> device_;  // first: destroyed last
  std::unique_ptr<completion_queue<Mode, Executor>> cq_;
  std::vector<std::unique_ptr<queue_pair>> qps_;  // after cq_: destroyed before it
  socket_type socket_;
  std::size_t max_write_ = 0;
  std::size_t cq_budget_ = 0;
  std::size_t cq_used_ = 0;
  std::vector<std::deque<segment*>> rings_;
  std::vector<ibv_send_wr> wrs_;
  std::vector<ibv_sge> sges_;
  static constexpr std::size_t max_chain = 1024;
  segment* chain_[max_chain] = {};
  std::uint32_t unsignalled_[64] = {};
  std::vector<std::unique_ptr<write_op>> pool_;
  std::vector<write_op*> free_;
  std::deque<write_op*> active_;
  std::shared_ptr<connection_state> keep_;
  std::error_code cause_;
  bool cause_from_wc_ = false;
  bool failed_ = false;
  bool closed_ = false;
  bool peer_gone_ = false;
  bool watch_pending_ = false;
  bool pumping_ = false;
  bool pump_pending_ = false;
  char watch_byte_ = 0;
};

}  // namespace shardline::verbs::detail
