// GPU memory over verbs (shardline/cuda/gpudirect.hpp), the parts that need libibverbs: what
// each path sets up (no GPU, no RDMA device); the verbs transport's hook for device memory and
// rxe's refusal of dma-buf (test suite "rdma": run in the Soft-RoCE VM, which has no GPU: the
// hook there registers host memory labelled cuda_device, standing in for dma-buf); the probe on
// a GPU machine without an RDMA device, and the staging each path picks (test suite "gpu").
// Not matched by the CUDA suite's glob (tests/gpu/test_cuda_*.cpp): it links libibverbs.
#include <shardline/cuda/gpudirect.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/transport/verbs/transport.hpp>
#include <shardline/weights_receiver.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include "../support/checks.hpp"
#include "../verbs/verbs_support.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace cuda = shardline::cuda;
namespace sl = shardline;
namespace sv = shardline::verbs;

namespace {

cuda::gpu_memory_plan plan_of(cuda::gpu_memory_path path, int device = 0) { return {path, device, "test"}; }

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Outside the VM the rdma cases say why they did not run (have_device prints it).
bool have_rdma() { return verbs_test::have_device(); }

}  // namespace

TEST_CASE("gpudirect: the dma-buf path registers device memory through dma-buf in the verbs options, the pinned one does not") {
  sv::options rdma;
  cuda::use_gpu_memory(plan_of(cuda::gpu_memory_path::dmabuf), rdma);
  CHECK(static_cast<bool>(rdma.register_device_memory));
  cuda::use_gpu_memory(plan_of(cuda::gpu_memory_path::pinned_replica), rdma);
  CHECK(!rdma.register_device_memory);
}

TEST_CASE("gpudirect: the pinned replica path gives a receiver a shadow and the device commit copy; dma-buf only the copy") {
  sl::receiver_options pinned;
  cuda::use_gpu_memory(plan_of(cuda::gpu_memory_path::pinned_replica), pinned);
  CHECK(pinned.shadow);
  CHECK(pinned.commit_copy.kinds.contains(sl::memory_kind::cuda_device));
  CHECK(static_cast<bool>(pinned.commit_copy.copy));
  sl::receiver_options direct;
  cuda::use_gpu_memory(plan_of(cuda::gpu_memory_path::dmabuf), direct);
  CHECK(!direct.shadow);  // senders write the device tensors in place
  CHECK(static_cast<bool>(direct.commit_copy.copy));
}

TEST_CASE("gpudirect: each path's staging: device memory for dma-buf, pinned host memory for the replica") {
  const auto d = cuda::staging_for(plan_of(cuda::gpu_memory_path::dmabuf, 1));
  CHECK(d.path == cuda::gpu_memory_path::dmabuf);
  CHECK(d.device == 1);
  const auto p = cuda::staging_for(plan_of(cuda::gpu_memory_path::pinned_replica, 0));
  CHECK(p.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(cuda::gpu_staging::block().location() == sl::memory_location::host_pinned());
}

TEST_CASE("gpudirect: register_dmabuf refuses memory that is not a CUDA device's, naming its location") {
  std::vector<std::byte> host(64);
  for (const auto where : {sl::memory_location::host(), sl::memory_location::host_pinned(), sl::memory_location::cuda(-1)}) {
    CAPTURE(sl::to_string(where));
    sl::testing::check_throws([&] { (void)cuda::register_dmabuf(nullptr, host, where, 0); }, sl::errc::unsupported_memory,
                              {"dma-buf registration: " + sl::to_string(where) + " memory is not memory of a CUDA device"});
  }
}

TEST_CASE("gpudirect: choose_gpu_memory_path without a GPU or without the RDMA device: the pinned replica, saying why") {
  sv::options rdma;
  rdma.device = "no_such_rdma_device";
  const auto plan = cuda::choose_gpu_memory_path(rdma, 0);
  INFO(plan.reason);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  if (cuda::device_count() == 0) {
    CHECK(plan.reason == "pinned replica: CUDA device 0 cannot be used (" + cuda::unavailable_reason() + ")");
  } else {
    // verbs::device's own words: "ibv_get_device_list found none" where there is no RDMA stack.
    CHECK(plan.reason.rfind("pinned replica: no RDMA device: ", 0) == 0);
    if (!sv::device_list().empty()) CHECK(contains(plan.reason, "no_such_rdma_device"));
  }
}

// ---- Soft-RoCE VM --------------------------------------------------------------------------------

TEST_CASE("gpudirect: rxe cannot register a dma-buf: EOPNOTSUPP, and the plan says so" * doctest::test_suite("rdma")) {
  if (!have_rdma()) return;
  auto dev = std::make_shared<sv::device>("", 1, -1);
  // Any descriptor will do: the device is asked before the buffer is looked at.
  const int fd = ::memfd_create("not-a-dmabuf", MFD_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::ftruncate(fd, 1 << 16) == 0);
  const auto ec = cuda::try_register_dmabuf(*dev, fd, 0, 4096, 0x10000);
  INFO("ibv_reg_dmabuf_mr on " << dev->name() << ": " << ec.message());
  std::printf("ibv_reg_dmabuf_mr on %s: %s (errno %d)\n", dev->name().c_str(), ec.message().c_str(), ec.value());
  CHECK(ec);
  CHECK(cuda::dmabuf_unsupported(ec));
  cuda::gpu_memory_probe probe;
  probe.dmabuf_supported = 1;
  probe.rdma_device = dev->name();
  probe.register_error = ec;
  CHECK(cuda::decide_gpu_memory_path(probe).reason ==
        "pinned replica: the RDMA device " + dev->name() + " cannot register dma-buf memory (" + ec.message() + ")");
  // memory_region's dma-buf constructor: the same errno, naming the range, the fd and the device.
  std::vector<std::byte> bytes(4096);
  try {
    sv::memory_region mr(dev, bytes, sv::memory_region::dmabuf{fd, 512}, IBV_ACCESS_LOCAL_WRITE);
    FAIL("rxe registered a dma-buf");
  } catch (const sl::error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(e.code() == ec);
    CHECK(what.rfind("verbs: ibv_reg_dmabuf_mr of 4096 bytes at 0x", 0) == 0);
    sl::testing::check_text(what, ec.message(),
                            {"(dma-buf fd " + std::to_string(fd) + ", offset 512) on " + dev->name() + " failed"});
  }
  // The whole probe in the VM: no GPU there, which is named first.
  const auto plan = cuda::decide_gpu_memory_path(cuda::probe_gpu_memory(dev.get(), {}, 0));
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason.rfind("pinned replica: CUDA device 0 cannot be used (", 0) == 0);
  std::printf("gpudirect in the VM: %s\n", plan.reason.c_str());
  ::close(fd);
}

TEST_CASE("gpudirect: with register_device_memory, cuda_device memory goes through it on both sides and is written by RDMA" *
          doctest::test_suite("rdma")) {
  if (!have_rdma()) return;
  // The VM has no GPU: the hook registers host memory labelled cuda_device (plain ibv_reg_mr),
  // standing in for register_dmabuf; what is under test is that both sides route device memory
  // through it, with the right access, and that a sender's pipeline-free write lands.
  struct call {
    sl::memory_location where;
    int access;
    std::size_t bytes;
  };
  std::vector<call> calls;
  auto hooked = verbs_test::keyed();
  hooked.register_device_memory = [&calls](const std::shared_ptr<sv::device>& dev, std::span<std::byte> bytes,
                                           sl::memory_location where, int access) {
    calls.push_back({where, access, bytes.size()});
    return sv::memory_region(dev, bytes, access);
  };
  asio::io_context io;
  sl::verbs_transport plain(io.get_executor(), verbs_test::keyed());
  sl::verbs_transport::receiver refusing(plain, verbs_test::listen_endpoint());
  CHECK(!refusing.exposable_kinds().contains(sl::memory_kind::cuda_device));
  CHECK(!plain.readable_kinds().contains(sl::memory_kind::cuda_device));

  sl::verbs_transport t(io.get_executor(), hooked);
  sl::verbs_transport::receiver r(t, verbs_test::listen_endpoint());
  CHECK(r.exposable_kinds() ==
        sl::memory_kinds{sl::memory_kind::host, sl::memory_kind::host_pinned, sl::memory_kind::cuda_device});
  CHECK(t.readable_kinds() == r.exposable_kinds());
  std::vector<std::byte> gpu_tensor(3 * 4096 + 100), host_tensor(4096);
  r.expose({"gpu.weight", gpu_tensor, sl::memory_location::cuda(0), {}});
  r.expose({"host.weight", host_tensor, sl::memory_location::host(), {}});
  REQUIRE(calls.size() == 1);  // host memory does not go through the hook
  CHECK(calls[0].where == sl::memory_location::cuda(0));
  // What the receiver registers its own memory with: local write, and remote write (or, with
  // memory windows, MW bind: the rkeys are then the windows'); never remote read.
  CHECK((calls[0].access & IBV_ACCESS_LOCAL_WRITE) != 0);
  CHECK((calls[0].access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_MW_BIND)) != 0);
  CHECK((calls[0].access & IBV_ACCESS_REMOTE_READ) == 0);
  CHECK(calls[0].bytes == gpu_tensor.size());
  CHECK(r.regions().find("gpu.weight")->location == sl::memory_location::cuda(0));

  std::vector<std::byte> staging(gpu_tensor.size());
  verbs_test::fill(staging, 7);
  const auto reg = t.register_memory(staging, sl::memory_location::cuda(0));
  REQUIRE(calls.size() == 2);
  CHECK(calls[1].access == 0);
  CHECK(reg.region().location == sl::memory_location::cuda(0));

  auto h = verbs_test::connect(io, t, r);
  REQUIRE_FALSE(h.accept_ec);
  REQUIRE_FALSE(h.connect_ec);
  const auto* region = h.conn->remote_regions().find("gpu.weight");
  REQUIRE(region != nullptr);
  CHECK(region->location == sl::memory_location::cuda(0));
  const sl::write_request w = sl::make_write(reg.region(), staging, *region, 0);
  std::optional<std::error_code> done;
  h.conn->async_write(std::span(&w, 1), [&done](std::error_code ec) { done = ec; });
  REQUIRE(verbs_test::run_until(io, [&] { return done.has_value(); }));
  CHECK_MESSAGE(!*done, done->message());
  CHECK(verbs_test::same(gpu_tensor, staging));
}

TEST_CASE("gpudirect: a weights_receiver over verbs adopts cuda_device tensors only where the transport registers them" *
          doctest::test_suite("rdma")) {
  if (!have_rdma()) return;
  sl::plan_options po;
  po.senders = 1;
  const std::vector<sl::parameter_descriptor> model{{"w", sl::dtype::bf16, {64, 32}}};
  const auto plan = sl::transfer_plan::build(model, sl::shard_map::standard(), po);
  std::vector<std::byte> bytes(64 * 32 * 2);
  const std::vector<sl::engine_tensor> on_gpu{{"w", sl::dtype::bf16, {64, 32}, bytes, sl::memory_location::cuda(0)}};
  asio::io_context io;
  {
    sl::verbs_transport plain(io.get_executor(), verbs_test::keyed());
    sl::verbs_transport::receiver r(plain, verbs_test::listen_endpoint());
    sl::testing::check_throws([&] { sl::weights_receiver<sl::verbs_transport::receiver> w(r, plan, 0, on_gpu); },
                              sl::errc::unsupported_memory, {"tensor 'w' is cuda_device:0 memory"});
    CHECK(r.regions().empty());
  }
  auto hooked = verbs_test::keyed();
  int calls = 0;
  hooked.register_device_memory = [&calls](const std::shared_ptr<sv::device>& dev, std::span<std::byte> b,
                                           sl::memory_location, int access) {
    ++calls;
    return sv::memory_region(dev, b, access);
  };
  sl::verbs_transport t(io.get_executor(), hooked);
  sl::verbs_transport::receiver r(t, verbs_test::listen_endpoint());
  sl::weights_receiver<sl::verbs_transport::receiver> w(r, plan, 0, on_gpu);
  CHECK(calls == 1);
  CHECK(r.regions().find("w")->location == sl::memory_location::cuda(0));
}

// ---- GPU machine (no RDMA device) ----------------------------------------------------------------

TEST_CASE("gpudirect: on a GPU machine without an RDMA device the probe exports dma-buf and picks the pinned replica" *
          doctest::test_suite("gpu")) {
  const auto probe = [] {
    std::string why;
    try {
      sv::device d("", 1, -1);
      why = "unexpected: an RDMA device " + d.name();
    } catch (const sl::error& e) {
      why = e.what();
    }
    return cuda::probe_gpu_memory(nullptr, why, 0);
  }();
  CHECK(probe.cuda_error.empty());
  CHECK(probe.dmabuf_supported == 1);
  CHECK_MESSAGE(probe.export_error.empty(), probe.export_error);
  const auto plan = cuda::choose_gpu_memory_path(sv::options{}, 0);
  INFO(plan.reason);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason.rfind("pinned replica: no RDMA device: ", 0) == 0);
  CHECK(contains(plan.reason, "; CUDA device 0 exports dma-buf, GPUDirect RDMA needs an RDMA device that registers it"));
  std::printf("gpudirect on this machine: %s\n", plan.reason.c_str());
}

TEST_CASE("gpudirect: each path's staging allocates what it says: device memory, or pinned host memory" *
          doctest::test_suite("gpu")) {
  for (const auto path : {cuda::gpu_memory_path::dmabuf, cuda::gpu_memory_path::pinned_replica}) {
    CAPTURE(cuda::to_string(path));
    const auto staging = cuda::staging_for(plan_of(path, 0));
    const auto block = staging.allocate(3 << 20, 4096);
    REQUIRE(block.bytes().size() == (3u << 20));
    CHECK(reinterpret_cast<std::uintptr_t>(block.bytes().data()) % 4096 == 0);
    cudaPointerAttributes a{};
    REQUIRE(cudaPointerGetAttributes(&a, block.bytes().data()) == cudaSuccess);
    if (path == cuda::gpu_memory_path::dmabuf) {
      CHECK(block.location() == sl::memory_location::cuda(0));
      CHECK(a.type == cudaMemoryTypeDevice);
      // And it exports as a dma-buf: what register_dmabuf would hand the RDMA device.
      const auto x = cuda::export_dmabuf(block.bytes(), 0);
      CHECK(x.valid());
    } else {
      CHECK(block.location() == sl::memory_location::host_pinned());
      CHECK(a.type == cudaMemoryTypeHost);
    }
  }
}
