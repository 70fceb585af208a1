// shardline/transport/verbs/device.hpp: the RDMA device list, an opened device (context + PD) and
// the lookup of the RoCE v2 GID that carries an IPv4 address.
#pragma once

#include <shardline/error.hpp>
#include <shardline/transport/verbs/detail/handles.hpp>

#include <infiniband/verbs.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <system_error>

namespace shardline::verbs {

/// The devices libibverbs sees. Empty (not an error) when the kernel has no RDMA stack.
class device_list {
public:
  device_list() {
    int n = 0;
    list_.reset(ibv_get_device_list(&n));
    count_ = list_ ? static_cast<std::size_t>(n) : 0;
  }
  std::span<ibv_device* const> devices() const noexcept { return {list_.get(), count_}; }
  std::size_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }
  /// "rxe0, mlx5_0" or "none": for error messages.
  std::string names() const {
    std::string s;
    for (auto* d : devices()) s += (s.empty() ? "" : ", ") + std::string(ibv_get_device_name(d));
    return s.empty() ? "none" : s;
  }

private:
  detail::device_list_handle list_;
  std::size_t count_ = 0;
};

/// True when `g` is ::ffff:a.b.c.d.
inline bool is_ipv4_mapped(const ibv_gid& g) noexcept {
  static constexpr unsigned char prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return std::memcmp(g.raw, prefix, sizeof prefix) == 0;
}

/// The index of the port's RoCE v2 GID holding an IPv4-mapped address, by type and
/// address, never by position. -1 (and ec set) when there is none.
inline int find_ipv4_roce_v2_gid(ibv_context* ctx, std::uint8_t port, int table_len,
                                 std::error_code& ec) {
  for (int i = 0; i < table_len; ++i) {
    ibv_gid_entry e{};
    if (ibv_query_gid_ex(ctx, port, static_cast<std::uint32_t>(i), &e, 0) != 0) continue;
    if (e.gid_type == IBV_GID_TYPE_ROCE_V2 && is_ipv4_mapped(e.gid)) {
      ec.clear();
      return i;
    }
  }
  ec = make_error_code(errc::no_device);
  return -1;
}

/// Whether a device with these attributes binds type 2 memory windows (ibv_alloc_mw with
/// IBV_MW_TYPE_2, bound by IBV_WR_BIND_MW on one QP): max_mw > 0 and device_cap_flags holding
/// MEM_WINDOW_TYPE_2A or MEM_WINDOW_TYPE_2B. Soft-RoCE (rxe, Linux 6.1) reports MEM_WINDOW,
/// MEM_WINDOW_TYPE_2B and max_mw 524287.
inline bool supports_type2_windows(const ibv_device_attr& a) noexcept {
  return a.max_mw > 0 &&
         (a.device_cap_flags & (IBV_DEVICE_MEM_WINDOW_TYPE_2A | IBV_DEVICE_MEM_WINDOW_TYPE_2B)) != 0;
}

/// An opened device: its context and one protection domain, the port's attributes and
/// the GID this side uses. Shared (shared_ptr) by every object made from it, so it
/// outlives them all.
class device {
public:
  /// Opens `name` (empty: the first device whose `port` is active) and looks up the GID
  /// (`gid_index` -1: the IPv4-mapped RoCE v2 one). Throws shardline::error
  /// (errc::no_device) naming the device and the cause.
  device(const std::string& name, std::uint8_t port, int gid_index) : port_(port) {
    device_list list;
    if (list.empty())
      throw error(make_error_code(errc::no_device),
                  "no RDMA device: ibv_get_device_list found none (is an RDMA driver loaded?)");
    std::string why;
    for (auto* d : list.devices()) {
      const std::string dn = ibv_get_device_name(d);
      if (!name.empty() && dn != name) continue;
      context_handle_reset(d);
      if (!ctx_) {
        why += dn + ": ibv_open_device failed (" + std::strerror(errno) + "); ";
        continue;
      }
      if (ibv_query_port(ctx_.get(), port_, &port_attr_) != 0) {
        why += dn + ": port " + std::to_string(port_) + " cannot be queried; ";
        ctx_.reset();
        continue;
      }
      if (port_attr_.state != IBV_PORT_ACTIVE) {
        why += dn + ": port " + std::to_string(port_) + " is not active; ";
        ctx_.reset();
        continue;
      }
      name_ = dn;
      break;
    }
    if (!ctx_) {
      if (!name.empty() && why.empty())
        why = "'" + name + "' not found among: " + list.names();
      throw error(make_error_code(errc::no_device), "no RDMA device: " + why);
    }
    if (gid_index >= 0) {
      gid_index_ = gid_index;
    } else {
      std::error_code ec;
      gid_index_ = find_ipv4_roce_v2_gid(ctx_.get(), port_, port_attr_.gid_tbl_len, ec);
      if (ec)
        throw error(ec, "no RDMA device: " + name_ + " port " + std::to_string(port_) +
                            " has no RoCE v2 GID with an IPv4-mapped address");
    }
    if (ibv_query_gid(ctx_.get(), port_, gid_index_, &gid_) != 0)
      throw error(make_error_code(errc::no_device),
                  "no RDMA device: " + name_ + " GID index " + std::to_string(gid_index_) +
                      " cannot be queried");
    pd_.reset(ibv_alloc_pd(ctx_.get()));
    if (!pd_)
      throw error(std::error_code(errno, std::system_category()),
                  "verbs: ibv_alloc_pd on " + name_ + " failed");
    if (ibv_query_device(ctx_.get(), &attr_) != 0) attr_ = {};  // then: no memory windows
  }

  device(const device&) = delete;
  device& operator=(const device&) = delete;

  ibv_context* context() const noexcept { return ctx_.get(); }
  ibv_pd* pd() const noexcept { return pd_.get(); }
  const std::string& name() const noexcept { return name_; }
  std::uint8_t port() const noexcept { return port_; }
  const ibv_port_attr& port_attr() const noexcept { return port_attr_; }
  int gid_index() const noexcept { return gid_index_; }
  const ibv_gid& gid() const noexcept { return gid_; }
  /// ibv_query_device's answer (zeroed when the query failed).
  const ibv_device_attr& attr() const noexcept { return attr_; }
  /// supports_type2_windows(attr()).
  bool supports_memory_windows() const noexcept { return supports_type2_windows(attr_); }

private:
  void context_handle_reset(ibv_device* d) { ctx_.reset(ibv_open_device(d)); }

  // Declared parent first: the PD goes before the context.
  detail::context_handle ctx_;
  detail::pd_handle pd_;
  std::string name_;
  std::uint8_t port_;
  ibv_port_attr port_attr_{};
  int gid_index_ = -1;
  ibv_gid gid_{};
  ibv_device_attr attr_{};
};

}  // namespace shardline::verbs
