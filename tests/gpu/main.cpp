// The CUDA suite's main: doctest, with the cases chosen by whether they need a GPU (those
// that do are in test suite "gpu").
//   shardline_gpu_tests --no-gpu   only the cases that need no GPU (CTest `cuda`: CI runs them)
//   shardline_gpu_tests --gpu      only the "gpu" cases; with no usable GPU it prints
//                                  "skipped: no GPU (<why>)" and exits 77, CTest's skip code
//                                  (CTest `cuda_gpu`)
//   shardline_gpu_tests            every case; with no usable GPU the "gpu" ones are left out,
//                                  and a line says so
//   shardline_gpu_tests --child NAME   internal: one scenario that must not run in the test
//                                  process (it faults the device), see gpu_support.hpp
//   shardline_gpu_tests --child NAME:ARG   internal: a scenario a test file registered
//                                  (gpu_test::register_child), e.g. a CUDA IPC receiver
// Any other argument goes to doctest.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <shardline/cuda/device.hpp>

#include "gpu_support.hpp"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--child") == 0) {
    const std::string spec = argv[2];
    const auto colon = spec.find(':');
    const auto it = gpu_test::child_scenarios().find(spec.substr(0, colon));
    if (it != gpu_test::child_scenarios().end())
      return it->second(colon == std::string::npos ? std::string() : spec.substr(colon + 1));
    return gpu_test::run_child(spec);
  }

  enum class mode { all, gpu, no_gpu } m = mode::all;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strcmp(argv[i], "--gpu") == 0)
      m = mode::gpu;
    else if (i > 0 && std::strcmp(argv[i], "--no-gpu") == 0)
      m = mode::no_gpu;
    else
      args.push_back(argv[i]);
  }

  doctest::Context context;
  context.applyCommandLine(static_cast<int>(args.size()), args.data());
  const int gpus = shardline::cuda::device_count();
  if (m == mode::gpu) {
    if (gpus == 0) {
      std::printf("skipped: no GPU (%s)\n", shardline::cuda::unavailable_reason().c_str());
      return 77;
    }
    context.addFilter("test-suite", "gpu");
  } else if (m == mode::no_gpu || gpus == 0) {
    if (m == mode::all)
      std::printf("GPU cases skipped: no GPU (%s)\n", shardline::cuda::unavailable_reason().c_str());
    context.addFilter("test-suite-exclude", "gpu");
  }
  if (gpus > 0) std::printf("CUDA devices: %d\n", gpus);
  return context.run();
}
