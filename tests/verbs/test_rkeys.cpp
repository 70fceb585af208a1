// Who can use a receiver's rkeys, in the Soft-RoCE VM (tests/rxe/run): a wrong rkey fails with a
// remote access error and the receiver serves on; with memory windows (options::memory_windows)
// each sender's rkeys work on the receiver's QP they were bound to and nowhere else, and are
// revoked when the sender leaves; without them they are the memory regions' own.
#include <shardline/transport/verbs/memory_window.hpp>

#include "verbs_support.hpp"

#include <shardline/transport/verbs/transport.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

using namespace verbs_test;

namespace {

using connection = sv::verbs_transport::connection;

// Notices the receiver delivered, in order, with their codes.
struct notice_log {
  std::vector<std::pair<std::error_code, sl::notice>> got;
  void wait(sv::verbs_transport::receiver& r) {
    r.async_wait_notification([this](std::error_code ec, sl::notice n) { got.emplace_back(ec, n); });
  }
};

std::error_code write(asio::io_context& io, connection& c, std::span<const sl::write_request> batch) {
  std::optional<std::error_code> done;
  c.async_write(batch, [&](std::error_code ec) { done = ec; });
  REQUIRE(run_until(io, [&] { return done.has_value(); }));
  return *done;
}

std::error_code write(asio::io_context& io, connection& c, const sl::write_request& w) {
  return write(io, c, std::span(&w, 1));
}

// A remote access error, as the transport reports it.
void check_remote_access_error(const std::error_code& ec) {
  CHECK(ec.category() == sv::wc_category());
  CHECK(ec.value() == IBV_WC_REM_ACCESS_ERR);
  CHECK(ec.message() == "remote access error");
}

// A receiver with one arena of `regions` regions of `bytes`, listening; senders connect to it.
struct receiver_side {
  explicit receiver_side(asio::io_context& io, sv::options o = {}, std::size_t bytes = 64 << 10,
                         std::size_t regions = 4)
      : t(io.get_executor(), keyed(std::move(o))), r(t, listen_endpoint()) {
    arena = r.allocate(bytes * regions);
    for (std::size_t i = 0; i < regions; ++i)
      r.expose("layer" + std::to_string(i) + ".weight", arena.subspan(i * bytes, bytes));
  }
  std::span<std::byte> remote(std::size_t i) {
    const auto n = arena.size() / r.regions().size();
    return arena.subspan(i * n, n);
  }
  sv::verbs_transport t;
  sv::verbs_transport::receiver r;
  std::span<std::byte> arena;
};

// A sender with staging as large as the receiver's arena, connected as `id`.
struct sender_side {
  sender_side(asio::io_context& io, receiver_side& rs, std::uint32_t id, sv::options o = {})
      : t(io.get_executor(), keyed(std::move(o))), staging(rs.arena.size()), reg(t.register_memory(staging)) {
    fill(staging, id);
    reconnect(io, rs, id);
  }
  void reconnect(asio::io_context& io, receiver_side& rs, std::uint32_t id) {
    auto h = connect(io, t, rs.r, {id, 0});
    REQUIRE_FALSE(h.accept_ec);
    REQUIRE_FALSE(h.connect_ec);
    conn = std::move(h.conn);
  }
  std::span<std::byte> local(std::size_t i) {
    const auto n = staging.size() / conn->remote_regions().size();
    return std::span(staging).subspan(i * n, n);
  }
  // One write per region: the whole update.
  std::vector<sl::write_request> update() {
    std::vector<sl::write_request> v;
    for (std::size_t i = 0; i < conn->remote_regions().size(); ++i)
      v.push_back(sl::make_write(reg.region(), local(i), conn->remote_regions().regions()[i]));
    return v;
  }
  sv::verbs_transport t;
  std::vector<std::byte> staging;
  sv::verbs_transport::registration reg;
  std::optional<connection> conn;
};

// Two RC QPs on one device connected to each other, outside the transport: the responder binds
// windows (as a receiver does), the requester writes through them.
struct qp_link {
  explicit qp_link(std::shared_ptr<sv::device> dev) {
    cq.reset(ibv_create_cq(dev->context(), 8, nullptr, nullptr, 0));
    REQUIRE(cq);
    requester = std::make_unique<sv::queue_pair>(dev, cq.get(), 4, 1);
    responder = std::make_unique<sv::queue_pair>(dev, cq.get(), 4, 1);
    REQUIRE_FALSE(requester->to_init(0));
    REQUIRE_FALSE(responder->to_init(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE));
    sv::options o;
    o.retry_count = 1;
    REQUIRE_FALSE(requester->connect(dev->gid(), responder->local(), o));
    REQUIRE_FALSE(responder->connect(dev->gid(), requester->local(), o));
  }
  ibv_wc_status post(ibv_qp* qp, ibv_send_wr wr) {
    ibv_send_wr* bad = nullptr;
    REQUIRE(ibv_post_send(qp, &wr, &bad) == 0);
    ibv_wc wc{};
    // Bounded only so that a lost completion cannot hang the suite.
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (ibv_poll_cq(cq.get(), 1, &wc) == 0) REQUIRE(std::chrono::steady_clock::now() < deadline);
    return wc.status;
  }
  // Binds `w` over `mr` on the responder: the window is for this link's requester alone.
  ibv_wc_status bind(sv::memory_window& w, const sv::memory_region& mr) { return post(responder->get(), w.bind(mr, 1)); }
  ibv_wc_status write(const sl::local_region& local, std::uint64_t remote, std::uint32_t rkey) {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(local.data), static_cast<std::uint32_t>(local.size), local.key};
    ibv_send_wr wr{};
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = remote;
    wr.wr.rdma.rkey = rkey;
    return post(requester->get(), wr);
  }
  sv::detail::cq_handle cq;
  std::unique_ptr<sv::queue_pair> requester, responder;  // after cq: destroyed first
};

bool windows_here(const sv::device& d) {
  if (d.supports_memory_windows()) return true;
  std::printf("skipped: %s has no type 2 memory windows\n", d.name().c_str());
  return false;
}

}  // namespace

TEST_CASE("verbs rkeys: type 2 windows are detected from max_mw and MEM_WINDOW_TYPE_2A/2B") {
  ibv_device_attr a{};
  CHECK_FALSE(sv::supports_type2_windows(a));
  a.device_cap_flags = IBV_DEVICE_MEM_WINDOW_TYPE_2B;
  CHECK_FALSE(sv::supports_type2_windows(a));  // max_mw 0
  a.max_mw = 16;
  CHECK(sv::supports_type2_windows(a));
  a.device_cap_flags = IBV_DEVICE_MEM_WINDOW_TYPE_2A;
  CHECK(sv::supports_type2_windows(a));
  a.device_cap_flags = IBV_DEVICE_MEM_WINDOW;  // type 1 only
  CHECK_FALSE(sv::supports_type2_windows(a));
}

TEST_CASE("verbs rkeys: a window bound on one QP takes writes there only; the region's own rkey and a destroyed window's are refused") {
  if (!have_device()) return;
  auto dev = std::make_shared<sv::device>("", 1, -1);
  if (!windows_here(*dev)) return;
  std::vector<std::byte> target(8192), source(4096);
  fill(source, 1);
  // As a receiver with windows registers: local write and MW bind, no remote access.
  sv::memory_region mr(dev, target, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_MW_BIND);
  sv::memory_region src(dev, source, 0);
  const auto at = reinterpret_cast<std::uintptr_t>(target.data());
  qp_link mine(dev);
  std::optional<sv::memory_window> w(std::in_place, dev);
  REQUIRE(mine.bind(*w, mr) == IBV_WC_SUCCESS);
  const std::uint32_t rkey = w->rkey();
  CHECK(rkey != mr.rkey());
  CHECK(mine.write(src.region(), at + 4096, rkey) == IBV_WC_SUCCESS);
  CHECK(same(source, std::span(target).subspan(4096)));
  {
    qp_link other(dev);  // another QP of the same device and PD
    CHECK(other.write(src.region(), at, rkey) == IBV_WC_REM_ACCESS_ERR);
  }
  {
    qp_link other(dev);
    CHECK(other.write(src.region(), at, mr.rkey()) == IBV_WC_REM_ACCESS_ERR);
  }
  // Revoked: the very QP it was bound to is refused once the window is gone.
  w.reset();
  std::vector<std::byte> before(target.begin(), target.end());
  fill(source, 2);
  CHECK(mine.write(src.region(), at, rkey) == IBV_WC_REM_ACCESS_ERR);
  CHECK(same(before, target));
}

TEST_CASE("verbs rkeys: a write under a wrong rkey fails with a remote access error naming its region; the receiver serves on and the next update lands whole") {
  if (!have_device()) return;
  sv::options o;
  SUBCASE("memory windows where the device has them") { o.memory_windows = sv::memory_window_use::automatic; }
  SUBCASE("memory regions' own rkeys") { o.memory_windows = sv::memory_window_use::off; }
  o.queue_pairs = 2;
  asio::io_context io;
  receiver_side rs(io, o);
  sender_side s(io, rs, 3, o);
  CHECK(s.conn->memory_windows() == rs.r.memory_windows());
  if (o.memory_windows == sv::memory_window_use::off) CHECK_FALSE(rs.r.memory_windows());
  notice_log log;
  log.wait(rs.r);

  auto bad = sl::make_write(s.reg.region(), s.local(1).first(4096), s.conn->remote_regions().regions()[1]);
  bad.remote_key ^= 0x5a5a00;  // no key the receiver gave
  const std::error_code ec = write(io, *s.conn, bad);
  check_remote_access_error(ec);
  CHECK(sv::describe(s.conn->remote_regions(), bad, ec) ==
        "write of 4096 bytes at +0 of region 'layer1.weight': remote access error");
  CHECK(all_zero(rs.arena));
  CHECK_FALSE(s.conn->is_open());

  // The sender starts over; the receiver saw the first connection go, and serves the second.
  s.conn->close();
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(log.got[0].first == sl::errc::peer_disconnected);
  CHECK(log.got[0].second == sl::notice{3, sl::notice_kind::abort, 0});
  s.reconnect(io, rs, 3);
  log.wait(rs.r);
  const auto all = s.update();
  CHECK_FALSE(write(io, *s.conn, all));
  std::optional<std::error_code> committed;
  s.conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code e) { committed = e; });
  REQUIRE(run_until(io, [&] { return committed && log.got.size() == 2; }));
  CHECK_FALSE(*committed);
  CHECK(log.got[1] == std::pair{std::error_code{}, sl::notice{3, sl::notice_kind::commit, 1}});
  CHECK(same(s.staging, rs.arena));
}

TEST_CASE("verbs rkeys: with memory windows each sender's rkeys work on its own QPs alone: another sender's QP, or another QP of its own, gets a remote access error") {
  if (!have_device()) return;
  sv::options o;
  o.queue_pairs = 2;
  o.memory_windows = sv::memory_window_use::required;
  asio::io_context io;
  std::optional<receiver_side> opened;
  {
    sv::device d("", 1, -1);
    if (!windows_here(d)) return;
  }
  opened.emplace(io, o);
  receiver_side& rs = *opened;
  REQUIRE(rs.r.memory_windows());
  sender_side a(io, rs, 1, o), b(io, rs, 2, o);
  REQUIRE(a.conn->memory_windows());
  REQUIRE(b.conn->memory_windows());

  // One arena, one registration: every region names it by number; no QP takes that number.
  const std::uint32_t key = rs.r.regions().regions()[0].key;
  for (const auto& r : rs.r.regions().regions()) CHECK(r.key == key);
  CHECK(a.conn->remote_regions().regions() == rs.r.regions().regions());
  const std::uint32_t a0 = a.conn->rkey(key, 0), a1 = a.conn->rkey(key, 1);
  const std::uint32_t b0 = b.conn->rkey(key, 0), b1 = b.conn->rkey(key, 1);
  CHECK(a0 != key);
  CHECK(a0 != a1);
  CHECK(a0 != b0);
  CHECK(a1 != b1);
  CHECK(a.conn->rkey(key ^ 0x5a5a00, 0) == (key ^ 0x5a5a00));  // not given: goes out unchanged

  // Sender B, admitted and connected, writes with A's rkey: its QP is not the one A's window
  // is bound to.
  auto stolen = sl::make_write(b.reg.region(), b.local(0).first(4096), b.conn->remote_regions().regions()[0]);
  stolen.remote_key = a0;
  check_remote_access_error(write(io, *b.conn, stolen));
  CHECK(all_zero(rs.arena));

  // A is untouched and writes every region, striped over both its QPs.
  CHECK_FALSE(write(io, *a.conn, a.update()));
  CHECK(same(a.staging, rs.arena));

  // A's own QP 0 with the rkey of A's window on QP 1: refused too (a one-WR write goes on QP 0).
  fill(a.staging, 11);
  auto crossed = sl::make_write(a.reg.region(), a.local(2).first(4096), a.conn->remote_regions().regions()[2]);
  crossed.remote_key = a1;
  check_remote_access_error(write(io, *a.conn, crossed));
  CHECK_FALSE(same(a.local(2).first(4096), rs.remote(2).first(4096)));

  // The receiver serves on: B starts over and its update lands whole.
  b.conn->close();
  notice_log log;
  log.wait(rs.r);
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(log.got[0].second.sender == 2);
  b.reconnect(io, rs, 2);
  CHECK_FALSE(write(io, *b.conn, b.update()));
  CHECK(same(b.staging, rs.arena));
}

TEST_CASE("verbs rkeys: with memory windows a sender's rkeys are revoked when it leaves; it comes back with new ones") {
  if (!have_device()) return;
  sv::options o;
  o.queue_pairs = 2;
  asio::io_context io;
  receiver_side rs(io, o);
  if (!rs.r.memory_windows()) {
    std::printf("skipped: %s has no type 2 memory windows\n", rs.t.get_device().name().c_str());
    return;
  }
  sender_side a(io, rs, 1, o), b(io, rs, 2, o);
  const std::uint32_t key = rs.r.regions().regions()[0].key;
  const std::uint32_t old0 = a.conn->rkey(key, 0), old1 = a.conn->rkey(key, 1);
  CHECK_FALSE(write(io, *a.conn, a.update()));
  CHECK(same(a.staging, rs.arena));

  notice_log log;
  log.wait(rs.r);
  a.conn->close();
  REQUIRE(run_until(io, [&] { return log.got.size() == 1; }));
  CHECK(log.got[0].first == sl::errc::peer_disconnected);
  CHECK(log.got[0].second == sl::notice{1, sl::notice_kind::abort, 0});

  // A's windows were deallocated with its QPs: their rkeys, from any QP, write nothing.
  fill(b.staging, 21);
  const std::vector<std::byte> before(rs.arena.begin(), rs.arena.end());
  auto revoked = sl::make_write(b.reg.region(), b.local(0).first(4096), b.conn->remote_regions().regions()[0]);
  revoked.remote_key = old0;
  check_remote_access_error(write(io, *b.conn, revoked));
  CHECK(same(before, rs.arena));

  // A reconnects under the same id: new windows, new rkeys; the old ones stay dead from its
  // new QPs too, and the new ones work.
  a.reconnect(io, rs, 1);
  const std::uint32_t new0 = a.conn->rkey(key, 0), new1 = a.conn->rkey(key, 1);
  CHECK(new0 != old0);
  CHECK(new1 != old1);
  fill(a.staging, 22);
  CHECK_FALSE(write(io, *a.conn, a.update()));
  CHECK(same(a.staging, rs.arena));
  auto stale = sl::make_write(a.reg.region(), a.local(1).first(4096), a.conn->remote_regions().regions()[1]);
  stale.remote_key = old0;
  fill(a.local(1), 23);
  check_remote_access_error(write(io, *a.conn, stale));
  CHECK_FALSE(same(a.local(1).first(4096), rs.remote(1).first(4096)));
}

TEST_CASE("verbs rkeys: without memory windows the table's keys are the regions' own rkeys, good on any QP of the device") {
  if (!have_device()) return;
  sv::options o;
  o.memory_windows = sv::memory_window_use::off;
  asio::io_context io;
  receiver_side rs(io, o);
  CHECK_FALSE(rs.r.memory_windows());
  sender_side s(io, rs, 5, o);
  CHECK_FALSE(s.conn->memory_windows());
  const auto& region = s.conn->remote_regions().regions()[0];
  CHECK(s.conn->rkey(region.key, 0) == region.key);
  CHECK(s.conn->rkey(region.key, 1) == region.key);
  // What windows prevent: any QP of the receiver's device that knows the rkey writes.
  std::vector<std::byte> source(4096);
  fill(source, 31);
  auto dev = rs.t.shared_device();
  sv::memory_region src(dev, source, 0);
  qp_link other(dev);
  CHECK(other.write(src.region(), region.address, region.key) == IBV_WC_SUCCESS);
  CHECK(same(source, rs.remote(0).first(4096)));
}
