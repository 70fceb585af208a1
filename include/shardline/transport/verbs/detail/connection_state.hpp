// shardline/transport/verbs/detail/connection_state.hpp: the sender side of one peer: its CQ, QPs,
// the write operations in flight, and the control socket that carries its notices.
#pragma once

#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/detail/control_link.hpp>
#include <shardline/transport/detail/erased_op.hpp>
#include <shardline/transport/detail/psk_auth.hpp>
#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/concepts.hpp>
#include <shardline/transport/verbs/completion_queue.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/error.hpp>
#include <shardline/transport/verbs/options.hpp>
#include <shardline/transport/verbs/queue_pair.hpp>

#include <asio/associated_cancellation_slot.hpp>
#include <asio/basic_stream_socket.hpp>
#include <asio/buffer.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/write.hpp>

#include <infiniband/verbs.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace shardline::verbs::detail {

// A pending write's or notice's handler (transport/detail/erased_op.hpp).
using completion_ptr = shardline::detail::op_ptr<shardline::detail::erased_op<std::error_code>>;

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
  bool in_flight = false;
};

// Pooled: recycled (generation bumped) only once every segment has retired, so a
// completion can never land on the next version's operation.
struct write_op {
  std::uint64_t gen = 1;
  std::uint64_t seq = 0;              // initiation order: a notice waits for every lower one
  completion_ptr handler;
  asio::cancellation_slot slot;
  std::vector<segment> segs;
  std::vector<std::size_t> cursor;    // per QP: the next segment to post on it
  std::size_t posted = 0;             // segments posted, or given up (cancel, failure)
  std::size_t remaining = 0;          // segments not yet retired
  std::error_code ec;
};

// One async_notify: sent once every write initiated before it has completed, completed by
// the receiver's echo.
struct notice_op {
  shardline::detail::notice_frame frame{};
  std::uint64_t after = 0;            // write seqs below this one must have completed
  std::uint64_t tag = 0;               // names its ack on the control link
  completion_ptr handler;             // null once cancelled
  asio::cancellation_slot slot;
};

template <poll_mode Mode, class Executor>
class connection_state final
    : public cq_consumer,
      public std::enable_shared_from_this<connection_state<Mode, Executor>> {
public:
  using socket_type = asio::basic_stream_socket<asio::ip::tcp, Executor>;

  connection_state(const Executor& ex, std::shared_ptr<device> dev, const options& o,
                   sender_identity who)
      : ex_(ex), opts_(o), device_(std::move(dev)), control_(socket_type(ex)), who_(who) {
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

  socket_type& socket() noexcept { return control_.socket(); }
  // The handshake proved the key: every notice and ack from now on is sealed.
  void seal_control(shardline::detail::session_key key) {
    control_.seal() = shardline::detail::notice_seal(std::move(key), shardline::detail::seal_direction::notice);
  }
  std::vector<qp_endpoint> endpoints() const {
    std::vector<qp_endpoint> v;
    for (auto& q : qps_) v.push_back(q->local());
    return v;
  }
  const device& dev() const noexcept { return *device_; }
  const sender_identity& identity() const noexcept { return who_; }
  std::size_t max_write() const noexcept { return max_write_; }

  std::error_code connect_qps(const ibv_gid& gid, const std::vector<qp_endpoint>& remote) {
    for (std::size_t i = 0; i < qps_.size(); ++i)
      if (auto ec = qps_[i]->connect(gid, remote[i], opts_)) return ec;
    return {};
  }

  region_table table;

  // The receiver's window keys (detail/wire.hpp): per row a table key, then its rkey on each
  // QP. Refused when malformed: a repeated or zero key.
  std::error_code set_window_keys(std::vector<std::uint32_t> words) {
    const std::size_t w = 1 + qps_.size();
    for (std::size_t r = 0; r < words.size(); r += w)
      if (words[r] == 0 || !window_row_.emplace(words[r], r + 1).second) {
        window_row_.clear();
        return make_error_code(errc::protocol_error);
      }
    window_keys_ = std::move(words);
    return {};
  }
  bool memory_windows() const noexcept { return !window_row_.empty(); }
  std::uint32_t rkey(std::uint32_t key, std::size_t qp) const noexcept {
    const std::uint32_t* k = window_rkeys(key);
    return k && qp < qps_.size() ? k[qp] : key;
  }

  bool is_open() const noexcept { return !failed_ && !closed_ && !control_ec_; }

  template <class Handler>
  void start_write(std::span<const write_request> batch, Handler&& handler) {
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto h = make_completion(std::forward<Handler>(handler));
    if (closed_) return complete_op(std::move(h), make_error_code(errc::not_connected));
    if (control_ec_) return complete_op(std::move(h), control_ec_);
    if (failed_) return complete_op(std::move(h), make_error_code(errc::connection_failed));
    // Checked whole before anything is posted: a batch that reaches outside the receiver's
    // table fails without moving a byte, and the connection goes on.
    for (const auto& w : batch)
      if (!table.covers(w.remote_address, w.source.size()))
        return complete_op(std::move(h), make_error_code(errc::region_not_exposed));

    write_op* op = acquire();
    const std::size_t n = qps_.size();
    for (const auto& w : batch) {
      const std::uint32_t* rkeys = window_rkeys(w.remote_key);  // one per QP; null: the key itself
      for (std::size_t off = 0; off < w.source.size(); off += max_write_) {
        segment s;
        s.op = op;
        s.local = reinterpret_cast<std::uintptr_t>(w.source.data()) + off;
        s.length = static_cast<std::uint32_t>(std::min<std::size_t>(max_write_,
                                                                    w.source.size() - off));
        s.lkey = w.source_key;
        s.remote = w.remote_address + off;
        s.qp = static_cast<std::uint32_t>(op->segs.size() % n);
        s.rkey = rkeys ? rkeys[s.qp] : w.remote_key;
        op->segs.push_back(s);
      }
    }
    op->seq = next_seq_++;
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
    settle();
    pump();
    if (!active_.empty()) cq_->kick();
  }

  template <class Handler>
  void start_notify(notice_kind kind, std::uint32_t version, Handler&& handler) {
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto h = make_completion(std::forward<Handler>(handler));
    if (closed_) return complete_op(std::move(h), make_error_code(errc::not_connected));
    if (control_ec_) return complete_op(std::move(h), control_ec_);
    auto n = std::make_unique<notice_op>();
    n->frame = shardline::detail::encode_notice(kind, version);
    n->after = next_seq_;
    n->tag = ++next_tag_;
    n->handler = std::move(h);
    if (slot.is_connected()) {
      n->slot = slot;
      slot.template emplace<notice_canceller>(notice_canceller{this->weak_from_this(), n.get()});
    }
    notices_.push_back(std::move(n));
    settle();
    pump_notices();
  }

  // Cancellation of a write: posted WRs cannot be recalled, so the operation posts nothing
  // more, waits for what it posted, then completes with operation_aborted. The QPs stay in
  // RTS. See connection::async_write for which types take effect when.
  struct canceller {
    std::weak_ptr<connection_state> state;
    write_op* op;
    std::uint64_t gen;
    void operator()(asio::cancellation_type type) const {
      if (auto s = state.lock()) s->cancel(op, gen, type);
    }
  };

  // Cancellation of a notice (any type): one not sent yet is withdrawn; one sent completes
  // now and its echo is still consumed when it comes.
  struct notice_canceller {
    std::weak_ptr<connection_state> state;
    notice_op* n;
    void operator()(asio::cancellation_type type) const {
      if (type == asio::cancellation_type::none) return;
      if (auto s = state.lock()) s->cancel_notice(n);
    }
  };

  void cancel(write_op* op, std::uint64_t gen, asio::cancellation_type type) {
    if (op->gen != gen || !op->handler) return;
    // Every WR is posted: nothing is left to stop, the write completes as it lands.
    if (op->posted == op->segs.size()) return;
    // Total cancellation promises no side effect: only while nothing is posted.
    constexpr auto stops_midway = asio::cancellation_type::terminal | asio::cancellation_type::partial;
    if ((type & stops_midway) == asio::cancellation_type::none &&
        ((type & asio::cancellation_type::total) == asio::cancellation_type::none || op->posted != 0))
      return;
    if (!op->ec) op->ec = asio::error::operation_aborted;
    op->remaining -= op->segs.size() - op->posted;
    op->posted = op->segs.size();
    for (auto& c : op->cursor) c = op->segs.size();
    if (op->remaining == 0) finish(op);
  }

  void cancel_notice(notice_op* n) {
    const auto it = std::find_if(notices_.begin(), notices_.end(),
                                 [n](const auto& p) { return p.get() == n; });
    if (it == notices_.end() || !(*it)->handler) return;
    auto h = take(**it);
    if (static_cast<std::size_t>(it - notices_.begin()) >= sent_) notices_.erase(it);
    complete_op(std::move(h), asio::error::operation_aborted);
    settle();
  }

  // Connected: from now on the control socket is always read, so that the receiver's end
  // is seen even by an idle sender.
  void start_control() { control_.watch(this->weak_from_this()); }

  void close() noexcept {
    if (closed_) return;
    closed_ = true;
    fail(asio::error::operation_aborted, false);
    fail_notices(asio::error::operation_aborted);
    control_.close();
    settle();
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
  // Per write request, not per WR: the rkeys of `key` on QPs 0.., or null.
  const std::uint32_t* window_rkeys(std::uint32_t key) const noexcept {
    if (window_row_.empty()) return nullptr;
    const auto it = window_row_.find(key);
    return it == window_row_.end() ? nullptr : window_keys_.data() + it->second;
  }

  write_op* acquire() {
    if (free_.empty()) {
      pool_.push_back(std::make_unique<write_op>());
      free_.push_back(pool_.back().get());
    }
    write_op* op = free_.back();
    free_.pop_back();
    op->segs.clear();
    op->posted = 0;
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
    complete_op(std::move(h), op->ec);
    pump_notices();
    settle();
  }

  // The QPs go to ERR: only for a failed work completion or post, a lost receiver, or
  // close(). Outstanding WRs flush; what was not posted yet is given up.
  void fail(std::error_code cause, bool from_wc) {
    if (failed_) return;
    failed_ = true;
    cause_ = cause;
    cause_from_wc_ = from_wc;
    for (auto& q : qps_) q->to_error();
    auto snapshot = active_;
    for (write_op* op : snapshot) {
      const std::size_t unposted = op->segs.size() - op->posted;
      op->posted = op->segs.size();
      op->remaining -= unposted;
      // close() or a lost receiver fails every pending write, even one whose WRs complete
      // fine now; after a failed completion, a write that lands whole still succeeds.
      if (!op->ec && (unposted || !from_wc))
        op->ec = from_wc ? make_error_code(errc::connection_failed) : cause;
      if (op->remaining == 0) finish(op);
    }
    if (!active_.empty()) cq_->kick();
  }

  // The control connection is over (the receiver left, or spoke garbage): notices fail with
  // `ec`, and so do the writes, whose QPs' peers are gone with it.
  void control_failed(std::error_code ec) {
    if (control_ec_ || closed_) return;
    control_ec_ = ec;
    control_.close();
    fail_notices(ec);
    fail(ec, false);
    settle();
  }

  template <class Handler>
  completion_ptr make_completion(Handler&& handler) {
    return shardline::detail::make_op<shardline::detail::erased_op<std::error_code>>(std::forward<Handler>(handler),
                                                                                     ex_);
  }

  static void complete_op(completion_ptr h, std::error_code ec) { shardline::detail::complete_op(std::move(h), ec); }

  completion_ptr take(notice_op& n) {
    n.slot.clear();
    n.slot = {};
    return std::move(n.handler);
  }

  void fail_notices(std::error_code ec) {
    auto pending = std::move(notices_);
    notices_.clear();
    sent_ = 0;
    for (auto& n : pending)
      if (n->handler) complete_op(take(*n), ec);
  }

  // Sends, in order, every notice whose earlier writes have all completed.
  void pump_notices() {
    if (closed_ || control_ec_) return;
    const std::uint64_t completed_below = active_.empty() ? next_seq_ : active_.front()->seq;
    for (; sent_ < notices_.size() && notices_[sent_]->after <= completed_below; ++sent_)
      control_.send(notices_[sent_]->frame, notices_[sent_]->tag);
  }

public:
  // ---- what shardline::detail::notice_link asks of its listener

  // The oldest notice sent, the link checked the echo against it; one cancelled meanwhile
  // has no handler left.
  void notice_acknowledged(std::uint64_t tag) {
    if (sent_ == 0 || notices_.front()->tag != tag) return control_failed(make_error_code(errc::protocol_error));
    auto done = std::move(notices_.front());
    notices_.pop_front();
    --sent_;
    if (done->handler) complete_op(take(*done), std::error_code{});
    settle();
  }

  // The control connection is over (the receiver left, or spoke garbage); the link also
  // reads for an idle sender, so its end fails what is outstanding now rather than after the
  // QPs' retry timeout.
  void control_ended(std::error_code why) { control_failed(why); }

private:
  // Keeps this state alive while work requests are outstanding: their completions still
  // come after the connection object is gone (closed).
  void settle() {
    if (!active_.empty()) {
      if (!keep_) keep_ = this->shared_from_this();
      return;
    }
    keep_.reset();  // every caller holds its own reference
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
      for (write_op* op : active_) {
        auto& c = op->cursor[q];
        while (c < op->segs.size()) {
          if (count >= wrs_.size() || ring.size() + count >= opts_.max_send_wr ||
              cq_used_ + count >= cq_budget_) {
            blocked = true;
            break;
          }
          add(count++, op->segs[c], c + n >= op->segs.size());
          c += n;
        }
        if (blocked) break;
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
    wr.opcode = IBV_WR_RDMA_WRITE;
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
  shardline::detail::notice_link<socket_type, connection_state, shardline::detail::notice_seal> control_;
  sender_identity who_;
  std::size_t max_write_ = 0;
  std::size_t cq_budget_ = 0;
  std::size_t cq_used_ = 0;
  std::vector<std::deque<segment*>> rings_;
  std::vector<ibv_send_wr> wrs_;
  std::vector<ibv_sge> sges_;
  static constexpr std::size_t max_chain = 1024;
  segment* chain_[max_chain] = {};
  std::uint32_t unsignalled_[64] = {};
  std::vector<std::uint32_t> window_keys_;  // rows of (key, one rkey per QP)
  std::unordered_map<std::uint32_t, std::size_t> window_row_;  // key -> its first rkey's index
  std::vector<std::unique_ptr<write_op>> pool_;
  std::vector<write_op*> free_;
  std::deque<write_op*> active_;      // in initiation (seq) order
  std::uint64_t next_seq_ = 0;
  std::deque<std::unique_ptr<notice_op>> notices_;  // [0, sent_) sent, awaiting their echo
  std::size_t sent_ = 0;
  std::uint64_t next_tag_ = 0;
  std::shared_ptr<connection_state> keep_;
  std::error_code cause_;
  std::error_code control_ec_;
  bool cause_from_wc_ = false;
  bool failed_ = false;
  bool closed_ = false;
  bool pumping_ = false;
  bool pump_pending_ = false;
};

}  // namespace shardline::verbs::detail
