// Writes the seed corpora (tests/fuzz/corpus/<target>/) from the real encoders: a few valid
// inputs per target, each the shape its target's header comment describes. Run by hand when a
// wire format changes: build/fuzz/make_seeds tests/fuzz/corpus (tests/fuzz/run --seeds does it).
#include <shardline/cuda/detail/ipc_wire.hpp>
#include <shardline/memory.hpp>
#include <shardline/transport/detail/control.hpp>
#include <shardline/transport/verbs/detail/wire.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace sl = shardline;
namespace sd = shardline::detail;
namespace fs = std::filesystem;

namespace {

fs::path root;

void seed(const char* target, const char* name, const std::string& bytes) {
  const auto dir = root / target;
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <class Frame>
std::string str(const Frame& f) {
  return std::string(reinterpret_cast<const char*>(f.data()), f.size());
}

std::string u8(unsigned v) { return std::string(1, static_cast<char>(v)); }

sl::region_table tensors(std::uint64_t base, sl::memory_location where, std::uint32_t key) {
  sl::region_table t;
  t.add({"layers.0.w", base, 64, key, where, sl::tensor_layout{sl::dtype::bf16, {4, 8}}});
  t.add({"layers.0.b", base + 64, 16, key, where, sl::tensor_layout{sl::dtype::f32, {4}}});
  t.add({"bytes", base + 128, 100, key, where, std::nullopt});
  t.add({"empty", base + 128, 0, key, where, std::nullopt});
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  root = argv[1];

  // region_table
  seed("region_table", "empty", sl::region_table{}.serialize());
  seed("region_table", "host_tensors", tensors(4096, sl::memory_location::host(), 0).serialize());
  seed("region_table", "cuda_tensors", tensors(1 << 20, sl::memory_location::cuda(1), 7).serialize());
  seed("region_table", "format_1", "SLRT" + std::string(12, '\0'));

  // control_frames
  seed("control_frames", "hello_shm", str(sd::encode_hello("SLSH", {3, 0xfeedfacecafebeefull})));
  seed("control_frames", "hello_verbs", str(sd::encode_hello("SLVB", {0, 0})));
  seed("control_frames", "verdict_refused", str(sd::encode_verdict(make_error_code(sl::errc::plan_mismatch))));
  std::string notices;
  for (auto k : {sl::notice_kind::begin, sl::notice_kind::commit, sl::notice_kind::abort, sl::notice_kind::withdraw})
    notices += str(sd::encode_notice(k, 42));
  seed("control_frames", "notices", notices);

  // handshake_receiver: config byte, hello, the prover's nonce, the exchange's bytes
  const std::string nonce(32, '\x11');
  seed("handshake_receiver", "admit_verbs", u8(0x00) + str(sd::encode_hello("SLVB", {2, 99})) + nonce + "xchg");
  seed("handshake_receiver", "admit_shm", u8(0x40) + str(sd::encode_hello("SLSH", {0, 0})) + nonce + "xchg");
  seed("handshake_receiver", "refuse", u8(0x01) + str(sd::encode_hello("SLVB", {1, 5})) + nonce + "xchg");
  seed("handshake_receiver", "retry_then_admit", u8(0x02 | (3 << 2)) + str(sd::encode_hello("SLVB", {1, 5})) + nonce + "xchg");
  seed("handshake_receiver", "retry_forever", u8(0x03) + str(sd::encode_hello("SLVB", {1, 5})) + nonce + "xchg");
  seed("handshake_receiver", "old_protocol", u8(0x00) + "SLVB" + std::string(16, '\x01'));

  // handshake_sender: config byte, then what the receiver sends; the prover takes the first
  // 32 bytes as its nonce, so the keyless verdict and exchange are repeated after them.
  const std::string admitted = str(sd::encode_verdict({})) + "xchg";
  seed("handshake_sender", "admitted", u8(0x00) + admitted + std::string(24, '\0') + admitted);
  seed("handshake_sender", "admitted_shm", u8(0x03) + admitted + std::string(24, '\0') + admitted);
  const std::string refused = str(sd::encode_verdict(make_error_code(sl::errc::unknown_sender)));
  seed("handshake_sender", "refused", u8(0x04) + refused + std::string(28, '\0') + refused);
  seed("handshake_sender", "challenge", u8(0x00) + "SLAU" + nonce + std::string(36, '\0') + admitted);

  // control_notices: config byte (bits 1-2: notices the sender sends, less one), then frames:
  // the acks of those notices, and notices for the receiver side.
  for (unsigned count = 1; count <= 4; ++count) {
    std::string acks;
    for (unsigned i = 0; i < count; ++i)
      acks += str(sd::encode_notice(static_cast<sl::notice_kind>(1 + i % 4), i + 1));
    const std::string name = "acks_" + std::to_string(count);
    seed("control_notices", name.c_str(), u8(((count - 1) << 1) | (count & 1)) + acks);
  }

  // shm_handshake: config byte, a size byte per arena, [a raw header], the payload
  auto arena_payload = [](std::vector<std::pair<std::uint64_t, std::uint64_t>> arenas, const sl::region_table& t) {
    std::string p;
    for (auto [base, length] : arenas) {
      sd::put_le<std::uint64_t>(p, base);
      sd::put_le<std::uint64_t>(p, length);
    }
    return p + t.serialize();
  };
  const std::uint64_t base = 0x7f0012340000;
  seed("shm_handshake", "no_arena", u8(0x00) + arena_payload({}, {}));
  seed("shm_handshake", "one_arena", u8(0x01) + u8(0) + arena_payload({{base, 4096}}, tensors(base, {}, 0)));
  {
    sl::region_table t = tensors(base, {}, 0);
    t.add({"second", base + 0x100000 + 512, 1024, 1, {}, std::nullopt});
    seed("shm_handshake", "two_arenas",
         u8(0x02) + u8(0) + u8(1) + arena_payload({{base, 4096}, {base + 0x100000, 8192}}, t));
  }
  {
    const auto p = arena_payload({{base, 4096}}, tensors(base, {}, 0));
    std::string h = "SLSH";  // shm_magic (transport/shm/transport.hpp)
    sd::put_le<std::uint32_t>(h, 1);
    sd::put_le<std::uint64_t>(h, p.size());
    seed("shm_handshake", "raw_header", u8(0x05) + u8(0) + h + p);
  }

  // verbs_wire
  ibv_gid gid{};
  for (int i = 0; i < 16; ++i) gid.raw[i] = static_cast<std::uint8_t>(0xf0 + i);
  namespace vd = shardline::verbs::detail;
  seed("verbs_wire", "one_qp", vd::encode_endpoints(gid, {{0x123, 0x456}}));
  seed("verbs_wire", "four_qps", vd::encode_endpoints(gid, {{1, 2}, {3, 4}, {5, 6}, {7, 8}}));

  // ipc_wire: the descriptor count, the header, then the export
  namespace cd = shardline::cuda::detail;
  cd::ipc_export x;
  x.boot_id = "8d0e4a1c-5d35-4f0c-9a65-0d1d2f3e4a5b";
  x.pid = 4242;
  cd::ipc_allocation legacy;
  legacy.kind = cd::ipc_handle_kind::legacy;
  legacy.device = 0;
  legacy.base = 1 << 20;
  legacy.size = 1 << 16;
  cd::ipc_allocation vmm;
  vmm.kind = cd::ipc_handle_kind::vmm;
  vmm.device = 0;
  vmm.base = 2 << 20;
  vmm.size = 2 << 20;
  vmm.fd_index = 0;
  x.allocations = {legacy, vmm};
  x.table = tensors(1 << 20, sl::memory_location::cuda(0), 0);
  x.table.add({"in_vmm", (2 << 20) + 4096, 1 << 20, 0, sl::memory_location::cuda(0), std::nullopt});
  const auto payload = cd::serialize(x);
  seed("ipc_wire", "legacy_and_vmm", u8(1) + cd::encode_header(1, payload.size()) + payload);
  cd::ipc_export none;
  none.boot_id = x.boot_id;
  const auto empty = cd::serialize(none);
  seed("ipc_wire", "empty", u8(0) + cd::encode_header(0, empty.size()) + empty);
  return 0;
}
