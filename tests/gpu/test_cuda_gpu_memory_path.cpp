// How GPU memory goes over verbs: the decision from what a probe saw (every outcome and its
// sentence, no GPU needed) and the dma-buf export of device memory (test suite "gpu": the lent
// H200 machines export dma-buf; they have no RDMA device, so the registration half is tested
// from probe results here and against rxe in tests/gpu/test_gpudirect_verbs.cpp).
#include <shardline/cuda/gpu_memory_path.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/dmabuf.hpp>

#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <string>
#include <system_error>
#include <vector>

namespace cuda = shardline::cuda;
namespace sl = shardline;

namespace {

// What a machine with a GPU that exports dma-buf and an RDMA device that registers it reports.
cuda::gpu_memory_probe all_passed() {
  cuda::gpu_memory_probe p;
  p.cuda_device = 1;
  p.dmabuf_supported = 1;
  p.rdma_device = "mlx5_0";
  p.registered = true;
  return p;
}

std::error_code errno_code(int e) { return {e, std::system_category()}; }

}  // namespace

TEST_CASE("gpu memory path: every step passed: dma-buf, naming the GPU, the RDMA device and the calls") {
  const auto plan = cuda::decide_gpu_memory_path(all_passed());
  CHECK(plan.path == cuda::gpu_memory_path::dmabuf);
  CHECK(plan.cuda_device == 1);
  CHECK(plan.reason ==
        "dma-buf: CUDA device 1 memory is registered on the RDMA device mlx5_0 through dma-buf "
        "(cuMemGetHandleForAddressRange + ibv_reg_dmabuf_mr): RDMA reads and writes it directly (GPUDirect RDMA)");
  CHECK(cuda::to_string(plan.path) == "dma-buf");
  CHECK(cuda::to_string(cuda::gpu_memory_path::pinned_replica) == "pinned replica");
}

TEST_CASE("gpu memory path: an RDMA device that cannot register dma-buf: pinned replica, naming it and the errno") {
  auto p = all_passed();
  p.rdma_device = "rxe0";
  p.registered = false;
  p.register_error = errno_code(EOPNOTSUPP);
  const auto plan = cuda::decide_gpu_memory_path(p);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason == "pinned replica: the RDMA device rxe0 cannot register dma-buf memory (Operation not supported)");
  // Every errno that means "no such operation here" says the same.
  for (int e : {EOPNOTSUPP, ENOTSUP, EPROTONOSUPPORT, ENOSYS}) {
    CAPTURE(e);
    CHECK(cuda::dmabuf_unsupported(errno_code(e)));
    p.register_error = errno_code(e);
    CHECK(cuda::decide_gpu_memory_path(p).reason.find("rxe0 cannot register dma-buf memory (") != std::string::npos);
  }
}

TEST_CASE("gpu memory path: another registration failure: pinned replica, naming the call, the GPU, the device, the errno") {
  auto p = all_passed();
  p.registered = false;
  p.register_error = errno_code(EFAULT);
  CHECK(!cuda::dmabuf_unsupported(p.register_error));
  CHECK(!cuda::dmabuf_unsupported(errno_code(EINVAL)));
  CHECK(!cuda::dmabuf_unsupported(errno_code(EPERM)));
  const auto plan = cuda::decide_gpu_memory_path(p);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason ==
        "pinned replica: ibv_reg_dmabuf_mr of CUDA device 1 memory on the RDMA device mlx5_0 failed (Bad address)");
}

TEST_CASE("gpu memory path: no RDMA device: pinned replica, with the device's own words, saying the GPU could export") {
  auto p = all_passed();
  p.rdma_device.clear();
  p.registered = false;
  p.rdma_error = "no RDMA device: ibv_get_device_list found none (is an RDMA driver loaded?)";
  const auto plan = cuda::decide_gpu_memory_path(p);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason ==
        "pinned replica: no RDMA device: ibv_get_device_list found none (is an RDMA driver loaded?); CUDA device 1 "
        "exports dma-buf, GPUDirect RDMA needs an RDMA device that registers it");
  p.rdma_error.clear();
  CHECK(cuda::decide_gpu_memory_path(p).reason.rfind("pinned replica: no RDMA device was probed; ", 0) == 0);
}

TEST_CASE("gpu memory path: the GPU's steps come first: unusable GPU, no dma-buf attribute, a failed export") {
  auto p = all_passed();
  p.cuda_error = "no CUDA driver";
  p.rdma_device = "rxe0";
  p.register_error = errno_code(EOPNOTSUPP);  // whatever the RDMA side said, the GPU's cause is named
  p.registered = false;
  CHECK(cuda::decide_gpu_memory_path(p).reason == "pinned replica: CUDA device 1 cannot be used (no CUDA driver)");

  p = all_passed();
  p.dmabuf_supported = 0;
  p.registered = false;
  auto plan = cuda::decide_gpu_memory_path(p);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason ==
        "pinned replica: CUDA device 1 cannot export its memory as dma-buf (CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0: "
        "the driver or the kernel lacks it)");

  p = all_passed();
  p.export_error = "cuMemGetHandleForAddressRange: operation not supported";
  p.registered = false;
  plan = cuda::decide_gpu_memory_path(p);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason ==
        "pinned replica: CUDA device 1's memory could not be exported as dma-buf (cuMemGetHandleForAddressRange: "
        "operation not supported)");
}

TEST_CASE("gpu memory path: registration not tried is not taken for success") {
  auto p = all_passed();
  p.registered = false;
  const auto plan = cuda::decide_gpu_memory_path(p);
  CHECK(plan.path == cuda::gpu_memory_path::pinned_replica);
  CHECK(plan.reason == "pinned replica: ibv_reg_dmabuf_mr was not tried on the RDMA device mlx5_0");
}

TEST_CASE("dma-buf export: host memory is refused, naming the call, the range and the device") {
  // Without a driver the export cannot even be asked; with one, host memory is not device memory.
  std::vector<std::byte> host(4096);
  std::error_code ec;
  const auto x = cuda::export_dmabuf(host, 0, ec);
  CHECK(ec);
  CHECK(!x.valid());
  CHECK(x.fd() == -1);
  try {
    (void)cuda::export_dmabuf(host, 0);
    FAIL("exporting host memory as a dma-buf should fail");
  } catch (const sl::error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(e.code() == ec);
    CHECK(what.rfind("cuMemGetHandleForAddressRange of 4096 bytes at 0x", 0) == 0);
    CHECK(what.find(" on CUDA device 0 (dma-buf export): " + ec.message()) != std::string::npos);
  }
}

TEST_CASE("dma-buf export: the H200's driver exports a cudaMalloc'd tensor, page-widened, and the fd closes with it" *
          doctest::test_suite("gpu")) {
  std::error_code ec;
  const bool supported = cuda::dmabuf_supported(0, ec);
  REQUIRE_MESSAGE(!ec, ec.message());
  REQUIRE_MESSAGE(supported, "CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0 on device 0");
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  cuda::device_buffer memory(4 << 20, 0);
  // A tensor that starts and ends inside pages: 256 bytes into the second page, 3 pages + 100 bytes long.
  const auto tensor = memory.bytes().subspan(page + 256, 3 * page + 100);
  int fd = -1;
  {
    auto x = cuda::export_dmabuf(tensor, 0);
    REQUIRE(x.valid());
    fd = x.fd();
    CHECK(fcntl(fd, F_GETFD) != -1);
    CHECK(x.device() == 0);
    CHECK(x.bytes().data() == tensor.data());
    CHECK(x.offset() == 256);
    CHECK(x.exported().data() == memory.data() + page);
    CHECK(x.exported().size() == 4 * page);
    // The dma-buf is as large as what was exported.
    CHECK(::lseek(fd, 0, SEEK_END) == static_cast<off_t>(4 * page));
    auto moved = std::move(x);
    CHECK(!x.valid());
    CHECK(moved.fd() == fd);
  }
  errno = 0;
  const int closed = fcntl(fd, F_GETFD);
  const int why = errno;  // before a CHECK's own output can change errno
  CHECK(closed == -1);
  CHECK(why == EBADF);
  // The whole allocation exports too.
  const auto whole = cuda::export_dmabuf(memory.bytes(), 0);
  CHECK(whole.offset() == 0);
  CHECK(whole.exported().size() == memory.size());
}
