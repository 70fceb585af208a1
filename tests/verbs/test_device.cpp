// The verbs building blocks on their own: device, GID lookup, RAII objects, no device.
#include <shardline/transport/verbs/device.hpp>

#include <shardline/transport/verbs/completion_queue.hpp>
#include <shardline/transport/verbs/memory_region.hpp>
#include <shardline/transport/verbs/queue_pair.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <arpa/inet.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace sv = shardline::verbs;

namespace {

bool have_device() {
  if (!sv::device_list().empty()) return true;
  std::printf("skipped: no RDMA device (run the verbs suite inside tests/rxe/run)\n");
  return false;
}

std::string rxe_address() {
  const char* a = std::getenv("RXE_ADDRESS");
  return a && *a ? a : "127.0.0.2";
}

}  // namespace

TEST_CASE("verbs device: no RDMA device (or a missing one) is a clear no_device error") {
  sv::device_list list;
  const std::string wanted = list.empty() ? "" : "no_such_device0";
  try {
    sv::device dev(wanted, 1, -1);
    FAIL("opening '" << wanted << "' should have failed");
  } catch (const shardline::error& e) {
    CHECK(e.code() == shardline::errc::no_device);
    const std::string what = e.what();
    CHECK(what.find("no RDMA device") != std::string::npos);
    if (list.empty())
      CHECK(what.find("found none") != std::string::npos);
    else
      CHECK(what.find("'no_such_device0' not found") != std::string::npos);
  }
}

TEST_CASE("verbs device: a port that does not exist is a no_device error naming the port") {
  if (!have_device()) return;
  try {
    sv::device dev("", 7, -1);
    FAIL("port 7 should not be usable");
  } catch (const shardline::error& e) {
    CHECK(e.code() == shardline::errc::no_device);
    CHECK(std::string(e.what()).find("port 7") != std::string::npos);
  }
}

TEST_CASE("verbs device: the GID lookup finds the IPv4-mapped RoCE v2 GID") {
  if (!have_device()) return;
  sv::device dev("", 1, -1);
  REQUIRE(dev.gid_index() >= 0);
  CHECK(sv::is_ipv4_mapped(dev.gid()));
  in_addr want{};
  REQUIRE(inet_pton(AF_INET, rxe_address().c_str(), &want) == 1);
  CHECK(std::memcmp(dev.gid().raw + 12, &want, 4) == 0);
  ibv_gid_entry e{};
  REQUIRE(ibv_query_gid_ex(dev.context(), 1, static_cast<std::uint32_t>(dev.gid_index()), &e, 0) == 0);
  CHECK(e.gid_type == IBV_GID_TYPE_ROCE_V2);
  // The link-local GID (index 0 on rxe) is never the one picked.
  CHECK_FALSE(dev.gid().raw[0] == 0xfe);
}

TEST_CASE("verbs device: RAII objects open and close, children before parents") {
  if (!have_device()) return;
  asio::io_context io;
  for (int round = 0; round < 3; ++round) {
    auto dev = std::make_shared<sv::device>("", 1, -1);
    std::vector<std::byte> bytes(1 << 16);
    sv::memory_region mr(dev, bytes, 0);
    CHECK(mr.region().data == bytes.data());
    CHECK(mr.region().size == bytes.size());
    CHECK(mr.lkey() != 0);
    sv::options o;
    sv::completion_queue<sv::poll_mode::event, asio::io_context::executor_type> cq(
        io.get_executor(), *dev, 64, o);
    CHECK(cq.capacity() >= 64);
    sv::queue_pair qp(dev, cq.get(), 16, 16);
    CHECK(qp.get()->qp_num != 0);
    CHECK_FALSE(qp.to_init(IBV_ACCESS_REMOTE_WRITE));
    qp.to_error();
    CHECK(cq.drain() == 0);
    // The objects keep the device alive: dropping our reference first is fine.
    dev.reset();
  }
}

TEST_CASE("verbs device: a memory region too large to register names its size") {
  if (!have_device()) return;
  auto dev = std::make_shared<sv::device>("", 1, -1);
  // An unmapped range cannot be pinned.
  std::span<std::byte> bogus(reinterpret_cast<std::byte*>(std::uintptr_t{4096}), 1u << 20);
  try {
    sv::memory_region mr(dev, bogus, 0);
    FAIL("registering unmapped memory should fail");
  } catch (const shardline::error& e) {
    CHECK(std::string(e.what()).find("ibv_reg_mr of 1048576 bytes") != std::string::npos);
    CHECK(e.code().category() == std::system_category());
  }
}
