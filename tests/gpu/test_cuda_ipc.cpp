// cuda::ipc_transport, what needs no GPU: the export's wire format and its refusals, which
// path an allocation takes, where an export comes from, the messages, and a sender facing a
// receiver whose handles it cannot use (a fake receiver speaks the handshake). The GPU cases
// are in test_cuda_ipc_gpu.cpp.
#include <shardline/cuda/ipc_transport.hpp>

#include <shardline/transport/detail/handshake.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace sl = shardline;
namespace cuda = shardline::cuda;
namespace cd = shardline::cuda::detail;

namespace {

cd::ipc_export sample_export() {
  cd::ipc_export x;
  x.boot_id = "6b2f0c4e-5d1a-4a53-9b0e-0123456789ab";
  x.pid = 4242;
  cd::ipc_allocation legacy;
  legacy.kind = cd::ipc_handle_kind::legacy;
  legacy.device = 0;
  legacy.uuid[0] = std::byte{0xab};
  legacy.base = 0x7f0000000000;
  legacy.size = 1 << 20;
  for (std::size_t i = 0; i < legacy.legacy.size(); ++i) legacy.legacy[i] = std::byte(i * 7 + 1);
  cd::ipc_allocation vmm;
  vmm.kind = cd::ipc_handle_kind::vmm;
  vmm.device = 1;
  vmm.uuid[15] = std::byte{0x42};
  vmm.base = 0x7f0000100000;  // right after the first: a region may span both
  vmm.size = 2 << 20;
  vmm.fd_index = 0;
  x.allocations = {legacy, vmm};
  x.table.add({"model.embed_tokens.weight", legacy.base + 4096, 8192, 0, sl::memory_location::cuda(0),
               sl::tensor_layout{sl::dtype::bf16, {64, 64}}});
  x.table.add({"model.layers.0.mlp.up_proj.weight", legacy.base + legacy.size - 1024, 4096, 0,
               sl::memory_location::cuda(1), std::nullopt});
  return x;
}

struct parsed {
  cd::ipc_export x;
  std::error_code ec;
  std::string why;
};

parsed parse(std::string_view bytes, std::size_t fds) {
  parsed p;
  p.x = cd::parse_export(bytes, fds, p.ec, p.why);
  return p;
}

bool mentions(const std::string& text, std::string_view word) { return text.find(word) != std::string::npos; }

// Offsets into the serialized sample, for the cases that corrupt one field.
constexpr std::size_t version_at = 4;
constexpr std::size_t boot_id_bytes = 36;
constexpr std::size_t count_at = 8 + 8 + boot_id_bytes + 4;
constexpr std::size_t first_entry_at = count_at + 4;

template <class Int>
void poke(std::string& s, std::size_t at, Int v) {
  std::string b;
  sl::detail::put_le<Int>(b, v);
  s.replace(at, sizeof(Int), b);
}

}  // namespace

TEST_CASE("cuda ipc wire: an export round-trips, handles, devices and regions intact") {
  const auto x = sample_export();
  const auto p = parse(cd::serialize(x), 1);
  REQUIRE_MESSAGE(!p.ec, p.why);
  CHECK(p.x.boot_id == x.boot_id);
  CHECK(p.x.pid == x.pid);
  CHECK(p.x.allocations == x.allocations);
  CHECK(p.x.table.regions() == x.table.regions());
}

TEST_CASE("cuda ipc wire: every truncation is refused as a protocol error, never read past") {
  const auto bytes = cd::serialize(sample_export());
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    CAPTURE(n);
    const auto p = parse(std::string_view(bytes).substr(0, n), 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK(!p.why.empty());
  }
}

TEST_CASE("cuda ipc wire: refusals name what is wrong") {
  auto bytes = cd::serialize(sample_export());
  SUBCASE("wrong magic") {
    bytes[0] = 'X';
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "magic"), p.why);
  }
  SUBCASE("another format version") {
    poke<std::uint32_t>(bytes, version_at, 7);
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_version_mismatch));
    CHECK_MESSAGE(mentions(p.why, "version 7"), p.why);
    CHECK_MESSAGE(mentions(p.why, "speaks " + std::to_string(cd::ipc_format_version)), p.why);
  }
  SUBCASE("an allocation count past the limit") {
    poke<std::uint32_t>(bytes, count_at, 0xffffffffu);
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "allocation count 4294967295"), p.why);
  }
  SUBCASE("an allocation count the message cannot hold") {
    poke<std::uint32_t>(bytes, count_at, 1000);
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "allocation count 1000"), p.why);
  }
  SUBCASE("a boot id longer than its limit") {
    poke<std::uint64_t>(bytes, 8, 1u << 20);
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "truncated header"), p.why);
  }
  SUBCASE("an unknown handle kind") {
    bytes[first_entry_at] = char(9);
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "allocation 0 has unknown handle kind 9"), p.why);
  }
  SUBCASE("an empty allocation") {
    poke<std::uint64_t>(bytes, first_entry_at + 1 + 4 + 16 + 8, 0);
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "allocation 0 has an empty or wrapping range"), p.why);
  }
  SUBCASE("allocations that overlap") {
    poke<std::uint64_t>(bytes, first_entry_at + 1 + 4 + 16 + 8, 2 << 20);
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "allocation 1 overlaps"), p.why);
  }
  SUBCASE("a VMM allocation whose descriptor did not come") {
    const auto p = parse(bytes, 0);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "allocation 1 names descriptor 0 of 0"), p.why);
  }
  SUBCASE("a descriptor that belongs to no allocation") {
    const auto p = parse(bytes, 2);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "descriptor 1 belongs to no allocation"), p.why);
  }
  SUBCASE("trailing bytes after the table") {
    bytes += "x";
    const auto p = parse(bytes, 1);
    CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
    CHECK_MESSAGE(mentions(p.why, "region table"), p.why);
  }
}

TEST_CASE("cuda ipc wire: a region outside every exported allocation is refused, naming it") {
  auto x = sample_export();
  x.table.add({"lm_head.weight", x.allocations[1].base + x.allocations[1].size - 16, 32, 0,
               sl::memory_location::cuda(1), std::nullopt});
  const auto p = parse(cd::serialize(x), 1);
  CHECK(p.ec == sl::make_error_code(sl::errc::protocol_error));
  CHECK_MESSAGE(mentions(p.why, "region 'lm_head.weight' lies outside every exported allocation"), p.why);

  auto host = sample_export();
  host.table.add({"on.host", host.allocations[0].base + 64, 16, 0, sl::memory_location::host(), std::nullopt});
  const auto q = parse(cd::serialize(host), 1);
  CHECK(q.ec == sl::make_error_code(sl::errc::protocol_error));
  CHECK_MESSAGE(mentions(q.why, "'on.host'"), q.why);
}

TEST_CASE("cuda ipc wire: the descriptor header is checked against what came with it") {
  const auto h = cd::encode_header(2, 4096);
  REQUIRE(h.size() == cd::ipc_header_bytes);
  const auto* b = reinterpret_cast<const std::byte*>(h.data());
  std::uint32_t fds = 0;
  std::uint64_t payload = 0;
  CHECK(!cd::decode_header(b, 2, fds, payload));
  CHECK(fds == 2);
  CHECK(payload == 4096);
  CHECK(cd::decode_header(b, 1, fds, payload) == sl::make_error_code(sl::errc::protocol_error));
  // Past 253 descriptors the header carries the first 253, carriers the rest.
  const auto many = cd::encode_header(600, 4096);
  const auto* m = reinterpret_cast<const std::byte*>(many.data());
  CHECK(!cd::decode_header(m, cd::ipc_fds_per_message, fds, payload));
  CHECK(fds == 600);
  CHECK(cd::decode_header(m, 600, fds, payload) == sl::make_error_code(sl::errc::protocol_error));
  const auto too_many = cd::encode_header(cd::ipc_max_allocations + 1, 4096);
  CHECK(cd::decode_header(reinterpret_cast<const std::byte*>(too_many.data()), cd::ipc_fds_per_message, fds,
                          payload) == sl::make_error_code(sl::errc::protocol_error));
  const auto big = cd::encode_header(0, cd::ipc_max_payload + 1);
  CHECK(cd::decode_header(reinterpret_cast<const std::byte*>(big.data()), 0, fds, payload) ==
        sl::make_error_code(sl::errc::protocol_error));
  auto bad = h;
  bad[1] = 'X';
  CHECK(cd::decode_header(reinterpret_cast<const std::byte*>(bad.data()), 2, fds, payload) ==
        sl::make_error_code(sl::errc::protocol_error));
}

TEST_CASE("cuda ipc: allocations are looked up by address; a range may span adjacent allocations, never a gap") {
  const auto x = sample_export();
  const auto& a = x.allocations;
  CHECK(cd::allocation_at(a, a[0].base) == 0);
  CHECK(cd::allocation_at(a, a[0].base + a[0].size - 1) == 0);
  CHECK(cd::allocation_at(a, a[1].base) == 1);
  CHECK(cd::allocation_at(a, a[0].base - 1) == -1);
  CHECK(cd::allocation_at(a, a[1].base + a[1].size) == -1);
  CHECK(cd::allocations_cover(a, a[0].base + a[0].size - 8, 16));
  CHECK_FALSE(cd::allocations_cover(a, a[1].base + a[1].size - 8, 16));
  auto gap = a;
  gap[1].base += 4096;
  CHECK_FALSE(cd::allocations_cover(gap, a[0].base + a[0].size - 8, 16));
}

TEST_CASE("cuda ipc: VMM memory with a POSIX descriptor handle type travels as one; anything else as a legacy handle") {
  CHECK(cd::choose_export(false, 0) == cd::export_path::legacy);
  CHECK(cd::choose_export(true, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) == cd::export_path::vmm);
  CHECK(cd::choose_export(true, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR | CU_MEM_HANDLE_TYPE_FABRIC) ==
        cd::export_path::vmm);
  CHECK(cd::choose_export(true, CU_MEM_HANDLE_TYPE_NONE) == cd::export_path::legacy);
  CHECK(cd::choose_export(true, CU_MEM_HANDLE_TYPE_FABRIC) == cd::export_path::legacy);
  // A handle type without a VMM allocation behind it means nothing.
  CHECK(cd::choose_export(false, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) == cd::export_path::legacy);
}

TEST_CASE("cuda ipc: an export is used in place in its own process, imported on its host and boot, refused elsewhere") {
  auto x = sample_export();
  CHECK(cd::origin_of(x, x.boot_id, x.pid) == cd::ipc_origin::same_process);
  CHECK(cd::origin_of(x, x.boot_id, x.pid + 1) == cd::ipc_origin::same_host);
  CHECK(cd::origin_of(x, "00000000-0000-0000-0000-000000000000", x.pid) == cd::ipc_origin::foreign);
  x.boot_id.clear();  // an exporter that could not read its boot id proves nothing
  CHECK(cd::origin_of(x, "", x.pid) == cd::ipc_origin::foreign);
  CHECK(!cd::this_boot_id().empty());
}

TEST_CASE("cuda ipc: a device is reachable when it is the sender's, or a peer it can access") {
  CHECK(cd::reachable(0, 0, false));
  CHECK(cd::reachable(0, 1, true));
  CHECK_FALSE(cd::reachable(0, 1, false));
  CHECK_FALSE(cd::reachable(0, -1, true));  // not visible to the sender at all
}

TEST_CASE("cuda ipc: errors say their cause once, in words") {
  const std::error_code foreign = cuda::ipc_errc::foreign_host;
  CHECK(std::string(foreign.category().name()) == "cuda ipc");
  CHECK(mentions(foreign.message(), "another host or boot"));
  const std::error_code unreachable = cuda::ipc_errc::device_unreachable;
  CHECK(mentions(unreachable.message(), "GPU this sender cannot reach"));
  CHECK(std::string(cd::driver_error_category().name()) == "cuda driver");
  CHECK(!cd::make_driver_error(CUDA_ERROR_INVALID_VALUE).message().empty());
  cd::device_uuid u{};
  u[0] = std::byte{0x6b};
  u[15] = std::byte{0x01};
  CHECK(cd::to_string(u) == "GPU-6b000000-0000-0000-0000-000000000001");
}

TEST_CASE("cuda ipc: kinds the transport cannot move are refused before CUDA is asked, naming the memory") {
  asio::io_context io;
  cuda::ipc_transport transport(io.get_executor());
  std::vector<std::byte> staging(64);
  try {
    (void)transport.register_memory(staging, sl::memory_location::host());
    FAIL("pageable host staging was registered");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::unsupported_memory);
    CHECK_MESSAGE(mentions(e.what(), "staging memory is host memory"), e.what());
    CHECK_MESSAGE(mentions(e.what(), "the cuda ipc transport"), e.what());
  }
  const auto path = "/tmp/shardline-ipc-kinds-" + std::to_string(::getpid()) + ".sock";
  cuda::ipc_transport::receiver rx(io.get_executor(), path);
  for (auto where : {sl::memory_location::host(), sl::memory_location::host_pinned()}) {
    try {
      rx.expose({"model.norm.weight", staging, where, std::nullopt});
      FAIL("expose took " << sl::to_string(where) << " memory");
    } catch (const sl::error& e) {
      CHECK(e.code() == sl::errc::unsupported_memory);
      CHECK_MESSAGE(mentions(e.what(), "cuda ipc receiver: region 'model.norm.weight'"), e.what());
      CHECK_MESSAGE(mentions(e.what(), sl::to_string(where)), e.what());
    }
  }
  CHECK(rx.regions().empty());
}

TEST_CASE("cuda ipc: a socket path a Unix socket cannot hold is refused, naming it") {
  asio::io_context io;
  const std::string path(200, 'p');
  try {
    cuda::ipc_transport::receiver rx(io.get_executor(), path);
    FAIL("a receiver listened on a 200-byte path");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::invalid_argument);
    CHECK_MESSAGE(mentions(e.what(), "cuda ipc receiver: socket path"), e.what());
  }
  cuda::ipc_transport transport(io.get_executor());
  std::optional<std::error_code> got;
  transport.async_connect(path, {}, [&](std::error_code ec, cuda::ipc_transport::connection) { got = ec; });
  io.run();
  REQUIRE(got);
  CHECK(*got == sl::errc::invalid_argument);
}

// ---- a fake receiver: speaks the handshake, then hands over whatever export it is given --

namespace {

using socket_type = asio::local::stream_protocol::socket;

struct fake_hooks {
  std::shared_ptr<std::string> payload;
  std::shared_ptr<std::vector<sl::detail::unique_fd>> fds;  // sent as the real receiver sends them
  sl::detail::judgement judge(const sl::sender_identity&) const { return {}; }
  template <class Handler>
  void operator()(socket_type& socket, const sl::sender_identity&, Handler&& handler) const {
    std::vector<int> raw;
    for (const auto& f : *fds) raw.push_back(f.get());
    const auto header = cd::encode_header(static_cast<std::uint32_t>(raw.size()), payload->size());
    const std::span<const int> all(raw);
    for (std::size_t at = 0; at == 0 || at < all.size(); at += cd::ipc_fds_per_message) {
      const auto group = all.subspan(at, std::min(cd::ipc_fds_per_message, all.size() - at));
      const std::string_view carrier = at == 0 ? std::string_view(header) : cd::ipc_fd_carrier;
      if (auto e = sl::detail::send_with_fds(socket.native_handle(), std::as_bytes(std::span(carrier)), group))
        return std::forward<Handler>(handler)(e, std::size_t{0});
    }
    asio::async_write(socket, asio::buffer(*payload), std::forward<Handler>(handler));
  }
};

// The sample with its legacy allocation alone (the fake sends no descriptors).
cd::ipc_export legacy_only_export() {
  auto x = sample_export();
  x.allocations.pop_back();
  x.table = {};
  x.table.add({"w", x.allocations[0].base, 64, 0, sl::memory_location::cuda(0), std::nullopt});
  return x;
}

// What a sender's async_connect says of a receiver that sends `payload` as its export.
std::error_code connect_to_fake(std::string payload, std::size_t fds = 0) {
  asio::io_context io;
  const auto path = "/tmp/shardline-ipc-fake-" + std::to_string(::getpid()) + ".sock";
  ::unlink(path.c_str());
  asio::local::stream_protocol::acceptor acceptor(io, asio::local::stream_protocol::endpoint(path));
  auto socket = std::make_shared<socket_type>(io);
  auto descriptors = std::make_shared<std::vector<sl::detail::unique_fd>>();
  for (std::size_t i = 0; i < fds; ++i) descriptors->emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  sl::detail::async_handshake_as_receiver(acceptor, socket, cd::ipc_magic, std::chrono::seconds(10),
                                          fake_hooks{std::make_shared<std::string>(std::move(payload)), descriptors},
                                          [socket](std::error_code, sl::sender_identity) {});
  cuda::ipc_transport transport(io.get_executor());
  std::optional<std::error_code> got;
  transport.async_connect(path, {1, 0}, [&](std::error_code ec, cuda::ipc_transport::connection c) {
    got = ec;
    CHECK_FALSE(c.is_open());
  });
  io.run_for(std::chrono::seconds(20));
  ::unlink(path.c_str());
  REQUIRE(got);
  return *got;
}

}  // namespace

TEST_CASE("cuda ipc: a sender refuses handles made on another host or boot, before importing any") {
  auto x = legacy_only_export();
  x.boot_id = "00000000-dead-beef-0000-000000000000";
  const auto ec = connect_to_fake(cd::serialize(x));
  CHECK(ec == cuda::ipc_errc::foreign_host);
  CHECK_MESSAGE(mentions(ec.message(), "another host or boot"), ec.message());
}

TEST_CASE("cuda ipc: a sender refuses memory on a GPU it does not see") {
  auto x = legacy_only_export();
  x.boot_id = cd::this_boot_id();
  x.pid = static_cast<std::uint32_t>(::getpid()) + 1;  // another process of this host
  x.allocations[0].uuid.fill(std::byte{0xee});  // no GPU has this UUID
  const auto ec = connect_to_fake(cd::serialize(x));
  CHECK(ec == cuda::ipc_errc::device_unreachable);
  CHECK_MESSAGE(mentions(ec.message(), "cannot reach"), ec.message());
}

TEST_CASE("cuda ipc: a malformed export fails the connect with protocol_error") {
  auto bytes = cd::serialize(legacy_only_export());
  bytes[0] = 'Z';
  CHECK(connect_to_fake(bytes) == sl::errc::protocol_error);
  // Descriptors announced for a VMM allocation that the header did not carry.
  CHECK(connect_to_fake(cd::serialize(sample_export())) == sl::errc::protocol_error);
}

TEST_CASE("cuda ipc: past 253 VMM allocations the descriptors arrive in carrier messages, each matched to its allocation") {
  // 600 allocations as an expandable segment of 600 chunks would have; made on another boot,
  // so the sender stops after parsing, before importing: what is checked is that all 600
  // descriptors arrived and matched (a missing one is a protocol error, not foreign_host).
  cd::ipc_export x;
  x.boot_id = "00000000-dead-beef-0000-000000000000";
  x.pid = 1;
  constexpr std::uint64_t chunk = 2 << 20;
  for (std::uint32_t i = 0; i < 600; ++i) {
    cd::ipc_allocation a;
    a.kind = cd::ipc_handle_kind::vmm;
    a.base = 0x7f0000000000 + i * chunk;
    a.size = chunk;
    a.fd_index = 599 - i;  // any order
    x.allocations.push_back(a);
  }
  x.table.add({"model.embed_tokens.weight", x.allocations[0].base + 4096, 599 * chunk, 0, sl::memory_location::cuda(0),
               std::nullopt});
  CHECK(connect_to_fake(cd::serialize(x), 600) == cuda::ipc_errc::foreign_host);
  CHECK(connect_to_fake(cd::serialize(x), 599) == sl::errc::protocol_error);
}
