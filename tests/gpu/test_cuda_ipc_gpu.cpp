// cuda::ipc_transport on a GPU (test suite "gpu"): a receiver in a process of its own (started
// by exec, never by a fork after CUDA initialised), legacy and VMM handles, every byte checked
// on the receiver after copying it back to the host, several senders, a receiver killed
// mid-update, the weights pipeline over the transport, and the transport conformance suite.
#include <shardline/cuda/ipc_transport.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/pinned_buffer.hpp>
#include <shardline/cuda/staging.hpp>
#include <shardline/pipeline.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <doctest/doctest.h>

#include "../support/shard_pattern.hpp"
#include "../support/transport_conformance.hpp"
#include "gpu_support.hpp"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace sl = shardline;
namespace cuda = shardline::cuda;
using namespace std::chrono_literals;

namespace {

void check(cudaError_t e, const std::string& what) { cuda::throw_if(e, what); }

std::byte byte_at(std::size_t i, unsigned seed) { return static_cast<std::byte>((i * 131 + seed * 29 + 1) & 0xff); }

std::vector<std::byte> patterned(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = byte_at(i, seed);
  return v;
}

std::vector<std::byte> to_host(const void* device, std::size_t n) {
  std::vector<std::byte> v(n);
  check(cudaMemcpy(v.data(), device, n, cudaMemcpyDefault), "cudaMemcpy to the host");
  return v;
}

// ---- child processes ----------------------------------------------------------------------

// A child of this executable, `--child spec`, its output in a file.
struct child_process {
  pid_t pid = -1;
  int exit_status = -1;
  std::string log;

  child_process(const std::string& spec, const std::string& name) {
    log = "/tmp/shardline-ipc-" + std::to_string(::getpid()) + "-" + name + ".log";
    char self[4096];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    REQUIRE(n > 0);
    self[n] = '\0';
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&files, 1, 2);
    std::string flag = "--child";
    std::vector<char*> argv{self, flag.data(), const_cast<char*>(spec.c_str()), nullptr};
    REQUIRE(posix_spawn(&pid, self, &files, nullptr, argv.data(), environ) == 0);
    posix_spawn_file_actions_destroy(&files);
  }
  child_process(const child_process&) = delete;
  ~child_process() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }

  // The exit status (128 + signal when killed), waiting at most `limit`; -1 on timeout.
  int wait(std::chrono::seconds limit = 120s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      if (const int status = poll(); status >= 0) return status;
      std::this_thread::sleep_for(10ms);
    }
    return -1;
  }

  // The exit status if the child has exited, -1 while it runs.
  int poll() {
    int status = 0;
    if (pid <= 0) return exit_status;
    if (::waitpid(pid, &status, WNOHANG) != pid) return -1;
    pid = -1;
    return exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  void kill_now() {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    pid = -1;
  }

  std::string output() const {
    std::ifstream in(log);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
};

std::string socket_path(const std::string& what) {
  return "/tmp/shardline-ipc-" + std::to_string(::getpid()) + "-" + what + ".sock";
}

// ---- the raw-transport scenario: which regions, where, written by whom --------------------

// Regions of the receiver, in two "chunks": in legacy mode two cudaMalloc allocations, in VMM
// mode two physical allocations (cuMemCreate, POSIX descriptor handle type) mapped one after
// the other, so that one region spans both. Each sender writes its own regions; the arena
// regions lie in a receiver-allocated arena (allocate(): cudaMalloc, legacy).
struct region_spec {
  std::string name;
  int chunk;  // 0, 1, or 2 for the arena
  std::size_t offset, size;
  std::uint32_t sender;
  unsigned seed;
};

constexpr std::size_t chunk_bytes = std::size_t(2) << 20;

std::vector<region_spec> scenario_regions(bool vmm, std::uint32_t senders) {
  std::vector<region_spec> r;
  for (std::uint32_t s = 0; s < senders; ++s) {
    r.push_back({"s" + std::to_string(s) + ".t0", 0, s * (128u << 10), 100000, s, 10 * s + 1});
    r.push_back({"s" + std::to_string(s) + ".t2", 1, s * (128u << 10) + 8192, 100000, s, 10 * s + 2});
    r.push_back({"s" + std::to_string(s) + ".arena", 2, s * (16u << 10), 16u << 10, s, 10 * s + 3});
  }
  if (vmm) r.push_back({"cross", 0, chunk_bytes - 4096, 8192, 0, 7});  // spans both allocations
  return r;
}

// VMM memory as PyTorch's expandable segments make it: physical chunks created shareable as
// POSIX descriptors, mapped into one reserved range.
struct vmm_range {
  CUdeviceptr base = 0;
  std::size_t size = 0;
  std::vector<CUmemGenericAllocationHandle> handles;

  // Throws std::runtime_error naming the call that failed (it runs in child processes,
  // outside any doctest case).
  static void must(CUresult r, const char* call) {
    if (r != CUDA_SUCCESS) throw std::runtime_error(std::string(call) + ": " + cuda::detail::make_driver_error(r).message());
  }

  vmm_range(int device, std::size_t chunks) {
    const auto& d = cuda::detail::driver();
    if (!d.available) throw std::runtime_error("no CUDA driver API");
    cuda::detail::context_scope scope(device);
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    std::size_t granularity = 0;
    must(d.allocation_granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity");
    if (chunk_bytes % granularity != 0) throw std::runtime_error("granularity " + std::to_string(granularity));
    size = chunks * chunk_bytes;
    must(d.address_reserve(&base, size, 0, 0, 0), "cuMemAddressReserve");
    for (std::size_t c = 0; c < chunks; ++c) {
      CUmemGenericAllocationHandle h = 0;
      must(d.create(&h, chunk_bytes, &prop, 0), "cuMemCreate");
      handles.push_back(h);
      must(d.map(base + c * chunk_bytes, chunk_bytes, 0, h, 0), "cuMemMap");
    }
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    must(d.set_access(base, size, &access, 1), "cuMemSetAccess");
    check(cudaMemset(reinterpret_cast<void*>(base), 0, size), "cudaMemset");
  }
  ~vmm_range() {
    const auto& d = cuda::detail::driver();
    (void)cudaDeviceSynchronize();
    for (std::size_t c = 0; c < handles.size(); ++c) (void)d.unmap(base + c * chunk_bytes, chunk_bytes);
    for (auto h : handles) (void)d.release(h);
    (void)d.address_free(base, size);
  }
  std::byte* data() const { return reinterpret_cast<std::byte*>(base); }
};

asio::awaitable<void> accept_forever(cuda::ipc_transport::receiver& rx) {
  while (true) {
    auto [ec, sender] = co_await rx.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
    (void)sender;
    if (ec == asio::error::operation_aborted || ec == sl::errc::not_connected) co_return;
  }
}

// Exit statuses of a receiver child.
enum rx_status { verified = 0, setup_failed = 2, wrong_bytes = 3, sender_failed = 4, no_commit = 5 };

// --child ipc-rx:MODE,SENDERS,PATH — exposes scenario_regions, accepts the senders, and once
// each committed version 1 checks every byte of every region, and that the arena's unexposed
// rest is still zero.
int ipc_receiver(const std::string& argument) {
  std::istringstream in(argument);
  std::string mode, senders_text, path;
  std::getline(in, mode, ',');
  std::getline(in, senders_text, ',');
  std::getline(in, path);
  const bool vmm = mode == "vmm";
  const auto senders = static_cast<std::uint32_t>(std::stoul(senders_text));
  try {
    asio::io_context io;
    cuda::ipc_transport::receiver rx(io.get_executor(), path);
    std::optional<vmm_range> range;
    std::vector<cuda::device_buffer> buffers;
    std::byte* chunk[3] = {};
    if (vmm) {
      range.emplace(0, 2);
      chunk[0] = range->data();
      chunk[1] = range->data() + chunk_bytes;
      for (int c = 0; c < 2; ++c) {  // what the driver says of each chunk, for the log
        CUdeviceptr b = 0;
        std::size_t n = 0;
        const auto r = cuda::detail::driver().get_address_range(&b, &n, reinterpret_cast<CUdeviceptr>(chunk[c]));
        std::printf("chunk %d: cuMemGetAddressRange -> %d, offset %lld, %zu bytes\n", c, int(r),
                    static_cast<long long>(b) - static_cast<long long>(range->base), n);
      }
    } else {
      for (int c = 0; c < 2; ++c) {
        buffers.emplace_back(chunk_bytes, 0);
        check(cudaMemset(buffers.back().data(), 0, chunk_bytes), "cudaMemset");
        chunk[c] = buffers.back().data();
      }
    }
    const auto arena = rx.allocate(64u << 10);
    chunk[2] = arena.data();
    const auto regions = scenario_regions(vmm, senders);
    for (const auto& r : regions)
      rx.expose({r.name, std::span(chunk[r.chunk] + r.offset, r.size), sl::memory_location::cuda(0), std::nullopt});
    std::printf("exported allocations: %zu (VMM: %zu)\n", rx.exported_allocations(), rx.exported_vmm_allocations());
    std::fflush(stdout);
    asio::co_spawn(io, accept_forever(rx), asio::detached);
    std::map<std::uint32_t, bool> committed;
    int status = no_commit;
    std::function<void()> next = [&] {
      rx.async_wait_notification([&](std::error_code ec, sl::notice n) {
        if (ec) {
          std::printf("sender %u failed: %s\n", n.sender, ec.message().c_str());
          status = sender_failed;
          return io.stop();
        }
        if (n.kind == sl::notice_kind::commit && n.version == 1) committed[n.sender] = true;
        if (committed.size() < senders) return next();
        status = verified;
        for (const auto& r : regions) {
          const auto got = to_host(chunk[r.chunk] + r.offset, r.size);
          if (got != patterned(r.size, r.seed)) {
            std::printf("region '%s': bytes differ\n", r.name.c_str());
            status = wrong_bytes;
          }
        }
        const auto whole = to_host(arena.data(), arena.size());
        for (std::size_t i = senders * (16u << 10); i < whole.size(); ++i)
          if (whole[i] != std::byte{0}) {
            std::printf("the arena's unexposed rest was written at %zu\n", i);
            status = wrong_bytes;
            break;
          }
        std::printf("%u senders committed; %zu regions checked byte for byte: %s\n", senders, regions.size(),
                    status == verified ? "all equal" : "DIFFERENT");
        rx.close();
        io.stop();
      });
    };
    next();
    io.run_for(100s);
    std::fflush(stdout);
    return status;
  } catch (const std::exception& e) {
    std::printf("receiver failed: %s\n", e.what());
    std::fflush(stdout);
    return setup_failed;
  }
}

const gpu_test::register_child ipc_rx_child("ipc-rx", ipc_receiver);

// --child ipc-rx-segment:PATH — one tensor over 300 VMM chunks (an expandable segment:
// more allocations than one SCM_RIGHTS message carries), written by sender 0 and checked.
constexpr std::size_t segment_chunks = 300;
constexpr std::size_t segment_bytes = segment_chunks * chunk_bytes - 8192;

int ipc_segment_receiver(const std::string& path) {
  try {
    asio::io_context io;
    cuda::ipc_transport::receiver rx(io.get_executor(), path);
    vmm_range range(0, segment_chunks);
    const std::span tensor(range.data() + 4096, segment_bytes);
    rx.expose({"model.embed_tokens.weight", tensor, sl::memory_location::cuda(0), std::nullopt});
    std::printf("exported allocations: %zu (VMM: %zu)\n", rx.exported_allocations(), rx.exported_vmm_allocations());
    std::fflush(stdout);
    asio::co_spawn(io, accept_forever(rx), asio::detached);
    int status = no_commit;
    std::function<void()> next = [&] {
      rx.async_wait_notification([&](std::error_code ec, sl::notice n) {
        if (ec) {
          std::printf("sender %u failed: %s\n", n.sender, ec.message().c_str());
          status = sender_failed;
          return io.stop();
        }
        if (n.kind != sl::notice_kind::commit) return next();
        status = to_host(tensor.data(), tensor.size()) == patterned(tensor.size(), 5) ? verified : wrong_bytes;
        std::printf("committed; %zu bytes over %zu chunks checked: %s\n", tensor.size(), segment_chunks,
                    status == verified ? "all equal" : "DIFFERENT");
        rx.close();
        io.stop();
      });
    };
    next();
    io.run_for(100s);
    std::fflush(stdout);
    return status;
  } catch (const std::exception& e) {
    std::printf("receiver failed: %s\n", e.what());
    std::fflush(stdout);
    return setup_failed;
  }
}

const gpu_test::register_child ipc_segment_child("ipc-rx-segment", ipc_segment_receiver);

// Connects, retrying while the receiver child is still starting.
cuda::ipc_transport::connection connect(asio::io_context& io, cuda::ipc_transport& t, const std::string& path,
                                        sl::sender_identity who, child_process& rx) {
  for (int attempt = 0; attempt < 1000; ++attempt) {
    if (const int status = rx.poll(); status >= 0)
      FAIL("the receiver exited (status " << status << ") before it took sender " << who.sender << ":\n" << rx.output());
    std::optional<std::error_code> got;
    cuda::ipc_transport::connection conn;
    t.async_connect(path, who, [&](std::error_code ec, cuda::ipc_transport::connection c) {
      got = ec;
      conn = std::move(c);
    });
    gpu_test::run_until(io, [&] { return got.has_value(); });
    if (!*got) return conn;
    if (*got != std::errc::no_such_file_or_directory && *got != std::errc::connection_refused)
      FAIL("connect to " << path << ": " << got->message());
    std::this_thread::sleep_for(20ms);
  }
  FAIL("the receiver at " << path << " never listened");
  return {};
}

std::error_code wait_op(asio::io_context& io, const std::function<void(std::function<void(std::error_code)>)>& start) {
  std::optional<std::error_code> got;
  start([&](std::error_code ec) { got = ec; });
  gpu_test::run_until(io, [&] { return got.has_value(); });
  return got.value_or(std::make_error_code(std::errc::timed_out));
}

// Sender `s` writes its regions from device memory (even senders) or pinned host memory
// (odd ones), every region in one batch, then begin and commit.
void push_regions(asio::io_context& io, cuda::ipc_transport& t, cuda::ipc_transport::connection& conn, bool vmm,
                  std::uint32_t senders, std::uint32_t s) {
  std::vector<region_spec> mine;
  for (const auto& r : scenario_regions(vmm, senders))
    if (r.sender == s) mine.push_back(r);
  std::size_t total = 0;
  for (const auto& r : mine) total += r.size;
  const bool device = s % 2 == 0;
  cuda::device_buffer dsrc;
  cuda::pinned_buffer psrc;
  std::span<std::byte> src;
  if (device) {
    dsrc = cuda::device_buffer(total, 0);
    src = dsrc.bytes();
  } else {
    psrc = cuda::pinned_buffer(total, 0);
    src = psrc.bytes();
  }
  auto reg = t.register_memory(src, device ? sl::memory_location::cuda(0) : sl::memory_location::host_pinned());
  std::vector<sl::write_request> batch;
  std::size_t at = 0;
  for (const auto& r : mine) {
    const auto bytes = patterned(r.size, r.seed);
    check(cudaMemcpy(src.data() + at, bytes.data(), r.size, cudaMemcpyDefault), "cudaMemcpy of the source");
    const auto* region = conn.remote_regions().find(r.name);
    REQUIRE_MESSAGE(region, "the receiver did not expose " << r.name);
    batch.push_back(sl::make_write(reg.region(), src.subspan(at, r.size), *region));
    at += r.size;
  }
  CHECK(wait_op(io, [&](auto h) { conn.async_notify(sl::notice_kind::begin, 1, h); }) == std::error_code{});
  CHECK(wait_op(io, [&](auto h) { conn.async_write(batch, h); }) == std::error_code{});
  CHECK(wait_op(io, [&](auto h) { conn.async_notify(sl::notice_kind::commit, 1, h); }) == std::error_code{});
}

void run_scenario(const std::string& mode, std::uint32_t senders) {
  const auto path = socket_path(mode + std::to_string(senders));
  child_process rx("ipc-rx:" + mode + "," + std::to_string(senders) + "," + path, mode);
  asio::io_context io;
  cuda::ipc_transport transport(io.get_executor());
  std::vector<cuda::ipc_transport::connection> conns;
  for (std::uint32_t s = 0; s < senders; ++s) conns.push_back(connect(io, transport, path, {s, 0}, rx));
  // A write outside every exposed region is refused before any byte moves.
  {
    std::vector<std::byte> none(16);
    const auto* r = conns[0].remote_regions().find("s0.t0");
    REQUIRE(r);
    cuda::pinned_buffer p(16, 0);
    auto reg = transport.register_memory(p.bytes(), sl::memory_location::host_pinned());
    const std::vector outside{sl::make_write(reg.region(), p.bytes(), *r, r->length - 8)};
    CHECK(wait_op(io, [&](auto h) { conns[0].async_write(outside, h); }) == sl::errc::region_not_exposed);
    CHECK(conns[0].is_open());
  }
  for (std::uint32_t s = 0; s < senders; ++s) push_regions(io, transport, conns[s], mode == "vmm", senders, s);
  const int status = rx.wait();
  const auto out = rx.output();
  INFO("receiver output:\n" << out);
  MESSAGE(out);
  CHECK(status == verified);
  if (mode == "vmm") CHECK(out.find("exported allocations: 3 (VMM: 2)") != std::string::npos);
  else CHECK(out.find("exported allocations: 3 (VMM: 0)") != std::string::npos);
}

}  // namespace

TEST_SUITE_BEGIN("gpu");

TEST_CASE("cuda ipc: legacy handles, one sender in another process: every byte lands") { run_scenario("legacy", 1); }

TEST_CASE("cuda ipc: VMM shareable handles (expandable segments), a region across two allocations: every byte lands") {
  run_scenario("vmm", 1);
}

TEST_CASE("cuda ipc: three senders (device and pinned sources) to one receiver process, legacy and VMM") {
  SUBCASE("legacy") { run_scenario("legacy", 3); }
  SUBCASE("vmm") { run_scenario("vmm", 3); }
}

TEST_CASE("cuda ipc: a tensor over 300 VMM chunks (past one message's descriptors) lands whole from one write") {
  const auto path = socket_path("segment");
  child_process rx("ipc-rx-segment:" + path, "segment");
  asio::io_context io;
  cuda::ipc_transport transport(io.get_executor());
  auto conn = connect(io, transport, path, {0, 0}, rx);
  cuda::device_buffer src(segment_bytes, 0);
  const auto bytes = patterned(segment_bytes, 5);
  check(cudaMemcpy(src.data(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice), "cudaMemcpy of the source");
  auto reg = transport.register_memory(src.bytes(), sl::memory_location::cuda(0));
  const auto* r = conn.remote_regions().find("model.embed_tokens.weight");
  REQUIRE(r);
  const std::vector batch{sl::make_write(reg.region(), src.bytes(), *r)};
  CHECK(wait_op(io, [&](auto h) { conn.async_write(batch, h); }) == std::error_code{});
  CHECK(wait_op(io, [&](auto h) { conn.async_notify(sl::notice_kind::commit, 1, h); }) == std::error_code{});
  const int status = rx.wait();
  const auto out = rx.output();
  INFO("receiver output:\n" << out);
  MESSAGE(out);
  CHECK(status == verified);
  CHECK(out.find("exported allocations: 300 (VMM: 300)") != std::string::npos);
}

TEST_CASE("cuda ipc: expose refuses memory that is not device memory of the declared device, naming the region") {
  asio::io_context io;
  cuda::ipc_transport::receiver rx(io.get_executor(), socket_path("kinds"));
  cuda::pinned_buffer pinned(4096, 0);
  std::vector<std::byte> pageable(4096);
  const auto refused = [&](std::span<std::byte> bytes, const std::string& name) {
    try {
      rx.expose({name, bytes, sl::memory_location::cuda(0), std::nullopt});
    } catch (const sl::error& e) {
      CHECK(e.code() == sl::errc::unsupported_memory);
      CHECK_MESSAGE(std::string(e.what()).find("cuda ipc receiver: region '" + name + "'") != std::string::npos, e.what());
      return std::string(e.what());
    }
    FAIL("expose took " << name);
    return std::string();
  };
  CHECK(refused(pinned.bytes(), "pinned").find("is host_pinned, not cuda_device:0") != std::string::npos);
  CHECK(refused(pageable, "pageable").find("pageable host memory") != std::string::npos);
  CHECK(rx.regions().empty());

  cuda::ipc_transport transport(io.get_executor());
  try {
    (void)transport.register_memory(pageable, sl::memory_location::host_pinned());
    FAIL("pageable memory registered as pinned");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::unsupported_memory);
    CHECK(std::string(e.what()).find("staging memory is pageable host memory") != std::string::npos);
  }
}

TEST_CASE("cuda ipc: the receiver process killed mid-update: the sender fails with peer_disconnected, no hang") {
  const auto path = socket_path("killed");
  child_process rx("ipc-rx:legacy,1," + path, "killed");
  asio::io_context io;
  cuda::ipc_transport transport(io.get_executor());
  auto conn = connect(io, transport, path, {0, 0}, rx);
  cuda::device_buffer src(100000, 0);
  auto reg = transport.register_memory(src.bytes(), sl::memory_location::cuda(0));
  const std::vector batch{sl::make_write(reg.region(), src.bytes(), *conn.remote_regions().find("s0.t0"))};
  CHECK(wait_op(io, [&](auto h) { conn.async_notify(sl::notice_kind::begin, 1, h); }) == std::error_code{});
  CHECK(wait_op(io, [&](auto h) { conn.async_write(batch, h); }) == std::error_code{});
  rx.kill_now();
  // The commit cannot be acknowledged by a dead receiver; the link fails, and says why.
  const auto commit = wait_op(io, [&](auto h) { conn.async_notify(sl::notice_kind::commit, 1, h); });
  CHECK(commit == sl::errc::peer_disconnected);
  gpu_test::run_until(io, [&] { return !conn.is_open(); });
  CHECK(wait_op(io, [&](auto h) { conn.async_write(batch, h); }) == sl::errc::peer_disconnected);
}

// ---- the weights pipeline over the transport ---------------------------------------------

namespace {

std::vector<sl::parameter_descriptor> model() {
  std::vector<sl::parameter_descriptor> t;
  for (int l = 0; l < 4; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", sl::dtype::bf16, {256}});
    t.push_back({p + "self_attn.q_proj.weight", sl::dtype::bf16, {256, 256}});
    t.push_back({p + "self_attn.k_proj.weight", sl::dtype::bf16, {64, 256}});
    t.push_back({p + "self_attn.v_proj.weight", sl::dtype::bf16, {64, 256}});
    t.push_back({p + "self_attn.o_proj.weight", sl::dtype::bf16, {256, 256}});
    t.push_back({p + "mlp.gate_proj.weight", sl::dtype::bf16, {512, 256}});
    t.push_back({p + "mlp.up_proj.weight", sl::dtype::bf16, {512, 256}});
  }
  return t;
}

// Two senders: q, k and v of each layer on one, the rest on the other, alternating by layer.
sl::transfer_plan pipeline_plan() {
  sl::plan_options o;
  o.bucket_bytes = 256 << 10;
  o.senders = 2;
  o.sender_of = [](const sl::parameter_descriptor& t) -> std::size_t {
    const std::size_t layer = static_cast<std::size_t>(t.name[13] - '0');
    const bool attn = t.name.find("_proj") != std::string::npos && t.name.find("self_attn") != std::string::npos;
    return (layer + (attn ? 0 : 1)) % 2;
  };
  return sl::transfer_plan::build(model(), sl::shard_map::standard(), o);
}

// --child ipc-weights:PATH — a rollout engine's device tensors (one cudaMalloc block, as an
// engine's allocator would hold them) adopted by a weights_receiver; checks every parameter
// byte for byte once version 1 commits.
int ipc_weights_receiver(const std::string& path) {
  try {
    const auto plan = pipeline_plan();
    asio::io_context io;
    cuda::ipc_transport::receiver rx(io.get_executor(), path);
    const auto params = plan.receiver_parameters(0);
    std::size_t total = 0;
    for (const auto& p : params) total += (p.bytes() + 255) / 256 * 256;
    cuda::device_buffer engine(total, 0);
    std::vector<sl::engine_tensor> tensors;
    std::size_t at = 0;
    for (const auto& p : params) {
      tensors.push_back({p.name, p.type, p.shape, std::span(engine.data() + at, p.bytes()), sl::memory_location::cuda(0)});
      at += (p.bytes() + 255) / 256 * 256;
    }
    sl::weights_receiver<cuda::ipc_transport::receiver> weights(rx, plan, 0, tensors);
    std::printf("adopted %zu device tensors in %zu exported allocation(s)\n", tensors.size(), rx.exported_allocations());
    asio::co_spawn(io, accept_forever(rx), asio::detached);
    int status = no_commit;
    weights.async_wait_commit([&](std::error_code ec, std::uint32_t v) {
      if (ec || v != 1) {
        std::printf("commit: %s, version %u\n", ec.message().c_str(), v);
        status = sender_failed;
      } else {
        status = verified;
        for (const auto& p : weights.parameters()) {
          const auto want = sl::testing::expected_bytes(plan, 0, p, 1);
          const auto live = weights.parameter(p.name);
          if (to_host(live.data(), live.size()) != want) {
            std::printf("parameter '%s' differs\n", p.name.c_str());
            status = wrong_bytes;
          }
        }
        std::printf("version 1 committed; %zu parameters checked byte for byte\n", weights.parameters().size());
      }
      rx.close();
      io.stop();
    });
    io.run_for(100s);
    std::fflush(stdout);
    return status;
  } catch (const std::exception& e) {
    std::printf("receiver failed: %s\n", e.what());
    std::fflush(stdout);
    return setup_failed;
  }
}

const gpu_test::register_child ipc_weights_child("ipc-weights", ipc_weights_receiver);

asio::awaitable<void> push_version(cuda::ipc_transport& t, sl::transfer_plan plan, std::size_t sender,
                                   std::string path) {
  auto ex = co_await asio::this_coro::executor;
  cuda::ipc_transport::connection conn;
  for (int attempt = 0;; ++attempt) {
    auto [ec, c] = co_await t.async_connect(path, {static_cast<std::uint32_t>(sender), plan.fingerprint()},
                                            asio::experimental::as_tuple(asio::use_awaitable));
    if (!ec) {
      conn = std::move(c);
      break;
    }
    if (attempt > 500) throw sl::error(ec, "connect " + path);
    asio::steady_timer pause(ex, 20ms);
    co_await pause.async_wait(asio::use_awaitable);
  }
  std::vector<cuda::ipc_transport::connection*> links{&conn};
  using config = sl::pipeline_config<2, sl::no_tracer, 64, (std::uint64_t(1) << 30), cuda::pinned_staging>;
  sl::update_pipeline<cuda::ipc_transport, config> pipeline(t, plan.for_sender(sender), links, {},
                                                            cuda::pinned_staging{0});
  co_await pipeline.async_update(1, sl::testing::fill, asio::use_awaitable);
}

}  // namespace

TEST_CASE("cuda ipc: the weights pipeline, two senders, into a receiver process's adopted device tensors") {
  const auto path = socket_path("weights");
  child_process rx("ipc-weights:" + path, "weights");
  const auto plan = pipeline_plan();
  asio::io_context io;
  cuda::ipc_transport transport(io.get_executor());
  auto first = asio::co_spawn(io, push_version(transport, plan, 0, path), asio::use_future);
  auto second = asio::co_spawn(io, push_version(transport, plan, 1, path), asio::use_future);
  gpu_test::run_until(io, [&] {
    return first.wait_for(0s) == std::future_status::ready && second.wait_for(0s) == std::future_status::ready;
  }, 60s);
  CHECK_NOTHROW(first.get());
  CHECK_NOTHROW(second.get());
  const int status = rx.wait();
  const auto out = rx.output();
  INFO("receiver output:\n" << out);
  MESSAGE(out);
  CHECK(status == verified);
}

// ---- conformance: both sides in this process (the receiver's pointers used in place) -----

namespace {

struct ipc_fixture {
  using transport_type = cuda::ipc_transport;
  using connection = transport_type::connection;
  static_assert(sl::transport<transport_type>);
  // Writes run at once unless a notice is ahead of them; the cases hold one there.
  static constexpr bool cancels_queued_writes = true;

  struct endpoint {
    transport_type::receiver rx;
    std::string path;
  };

  static bool usable() { return cuda::device_count() > 0; }

  asio::io_context io;
  transport_type transport{io.get_executor()};

  endpoint make_endpoint(std::size_t notice_depth = 64) {
    static int counter = 0;
    std::string path = socket_path("conformance-" + std::to_string(++counter));
    cuda::ipc_options o;
    o.notice_depth = notice_depth;
    return endpoint{transport_type::receiver(io.get_executor(), path, o), path};
  }

  conformance::connected<connection> connect(endpoint& ep, sl::sender_identity who) {
    conformance::outcome<std::error_code, std::uint32_t> accepted;
    conformance::outcome<std::error_code, connection> done;
    ep.rx.async_accept(accepted.handler());
    transport.async_connect(ep.path, who, done.handler());
    if (!conformance::drive(io, [&] { return accepted.ready() && done.ready(); }))
      return {std::make_error_code(std::errc::timed_out), std::nullopt};
    CHECK(accepted.code() == done.code());
    if (done.code()) return {done.code(), std::nullopt};
    return {{}, std::move(std::get<1>(done.get()))};
  }

  void kill(endpoint& ep) { ep.rx.close(); }

  // The hooks for device memory: the receiver's bytes read back to the host, and host
  // sources page-locked in place (this transport copies from pinned or device memory).
  std::vector<std::byte> host_copy(std::span<const std::byte> device) { return to_host(device.data(), device.size()); }

  struct pinned_source {
    sl::local_region r;
    sl::local_region region() const { return r; }
    pinned_source(const pinned_source&) = delete;
    pinned_source(sl::local_region x) : r(x) {}
    ~pinned_source() { (void)cudaHostUnregister(r.data); }
  };
  pinned_source register_source(std::span<std::byte> bytes) {
    check(cudaHostRegister(bytes.data(), bytes.size(), cudaHostRegisterPortable), "cudaHostRegister");
    return pinned_source(transport.register_memory(bytes, sl::memory_location::host_pinned()).region());
  }
};

using ipc_fixtures = std::tuple<ipc_fixture>;

}  // namespace

namespace conformance {
TEST_CASE_TEMPLATE_APPLY(notice_after_write, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(notice_order, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(batch_validation, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(cancelled_write, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(cancelled_notice, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(close_later, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(close_pending, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(peer_death, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(reuse_after_failure, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(expose_refusals, ipc_fixtures);
TEST_CASE_TEMPLATE_APPLY(several_senders, ipc_fixtures);
// memory_kinds asks for host memory on both sides: the cases above cover this transport's
// kinds (test_cuda_ipc.cpp and "expose refuses memory that is not device memory").
}  // namespace conformance

TEST_SUITE_END();
