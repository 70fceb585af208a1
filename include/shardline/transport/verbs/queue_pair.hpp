// shardline/transport/verbs/queue_pair.hpp: an RC queue pair and its INIT -> RTR -> RTS transitions.
#pragma once

#include <shardline/error.hpp>
#include <shardline/transport/verbs/detail/handles.hpp>
#include <shardline/transport/verbs/device.hpp>
#include <shardline/transport/verbs/options.hpp>

#include <infiniband/verbs.h>

#include <cerrno>
#include <cstdint>
#include <random>
#include <string>
#include <system_error>

namespace shardline::verbs {

/// What a peer needs to connect to one of our QPs (sent over the control connection).
struct qp_endpoint {
  std::uint32_t qp_num = 0;
  std::uint32_t psn = 0;
};

/// An RC QP on `cq` (send and receive). Keeps its device alive; the CQ must outlive it
/// (the owner declares the CQ before its QPs).
class queue_pair {
public:
  queue_pair(std::shared_ptr<device> dev, ibv_cq* cq, std::uint32_t max_send_wr,
             std::uint32_t max_recv_wr)
      : device_(std::move(dev)) {
    ibv_qp_init_attr a{};
    a.send_cq = cq;
    a.recv_cq = cq;
    a.qp_type = IBV_QPT_RC;
    a.sq_sig_all = 0;  // selective signalling
    a.cap.max_send_wr = max_send_wr;
    a.cap.max_recv_wr = max_recv_wr ? max_recv_wr : 1;
    a.cap.max_send_sge = 1;
    a.cap.max_recv_sge = 1;
    qp_.reset(ibv_create_qp(device_->pd(), &a));
    if (!qp_)
      throw error(std::error_code(errno, std::system_category()),
                  "verbs: ibv_create_qp (RC, " + std::to_string(max_send_wr) +
                      " send WRs) on " + device_->name() + " failed");
    std::random_device rd;
    psn_ = rd() & 0xffffff;
  }

  ibv_qp* get() const noexcept { return qp_.get(); }
  qp_endpoint local() const noexcept { return {qp_->qp_num, psn_}; }

  /// RESET -> INIT with `access` (IBV_ACCESS_REMOTE_WRITE on the receiver, 0 on the sender).
  std::error_code to_init(int access) noexcept {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = device_->port();
    a.qp_access_flags = static_cast<unsigned>(access);
    return modify(a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
  }

  /// INIT -> RTR -> RTS towards `remote` (its GID and QP), with the timeouts of `o`.
  std::error_code connect(const ibv_gid& remote_gid, qp_endpoint remote,
                          const options& o) noexcept {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = device_->port_attr().active_mtu;
    a.dest_qp_num = remote.qp_num;
    a.rq_psn = remote.psn;
    a.max_dest_rd_atomic = 1;
    a.min_rnr_timer = 12;
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.dgid = remote_gid;
    a.ah_attr.grh.sgid_index = static_cast<std::uint8_t>(device_->gid_index());
    a.ah_attr.grh.hop_limit = 64;
    a.ah_attr.port_num = device_->port();
    if (auto ec = modify(a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                                IBV_QP_MIN_RNR_TIMER))
      return ec;
    ibv_qp_attr r{};
    r.qp_state = IBV_QPS_RTS;
    r.timeout = o.timeout;
    r.retry_cnt = o.retry_count;
    r.rnr_retry = o.rnr_retry;
    r.sq_psn = psn_;
    r.max_rd_atomic = 1;
    return modify(r, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                         IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
  }

  /// Moves the QP to the error state: every outstanding WR completes with a flush error.
  void to_error() noexcept {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    (void)ibv_modify_qp(qp_.get(), &a, IBV_QP_STATE);
  }

private:
  std::error_code modify(ibv_qp_attr& a, int mask) noexcept {
    const int rc = ibv_modify_qp(qp_.get(), &a, mask);
    return rc ? std::error_code(rc, std::system_category()) : std::error_code{};
  }

  std::shared_ptr<device> device_;  // before qp_: destroyed after it
  detail::qp_handle qp_;
  std::uint32_t psn_ = 0;
};

}  // namespace shardline::verbs
