// bench/nccl_dl.hpp: NCCL for the CUDA benchmarks' baselines, loaded at run time with dlopen,
// so they build where NCCL is not installed (CI has neither a GPU nor NCCL) and say
// "skipped: NCCL not found (...)" where it cannot be loaded.
//
// Where from, first found wins: the file SHARDLINE_NCCL_LIBRARY names (nothing else when it
// is set); libnccl.so.2 through the dynamic linker's own search; libnccl.so* under the
// folders of python3's `nvidia` package (the pip package nvidia-nccl-cu13 that PyTorch
// brings). load() sets SHARDLINE_NCCL_LIBRARY to the file it loaded, so processes this
// one starts load the same library without searching again.
#pragma once

#include <cuda_runtime_api.h>

#include <dlfcn.h>

#include <array>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace nccl_dl {

// The few declarations of nccl.h these benchmarks use, written here so that nothing of NCCL
// is needed at build time. Layout and values as in NCCL 2.x's nccl.h (ncclUniqueId is
// NCCL_UNIQUE_ID_BYTES = 128 bytes; ncclSuccess = 0; ncclBfloat16 = 9; ncclComm_t is a
// pointer to an opaque struct): checked by hand against the nccl.h of NCCL 2.28.9 (the dev
// machine's CUDA) and of the pip package nvidia-nccl-cu13 on nvidia-h200-x2, and by the
// static_asserts below wherever nccl.h is on the include path. load() refuses a library older
// than 2.19 (ncclBfloat16 exists since 2.10).
struct unique_id {
  std::array<char, 128> internal;
};
static_assert(sizeof(unique_id) == 128);
struct opaque_comm;
using comm_t = opaque_comm*;
using result_t = int;  // ncclResult_t: an enum, passed as int
inline constexpr result_t success = 0;
inline constexpr int bfloat16 = 9;  // ncclDataType_t ncclBfloat16

#if __has_include(<nccl.h>)
}  // namespace nccl_dl
#include <nccl.h>
namespace nccl_dl {
// Where nccl.h is installed, the declarations above are checked against it at build time.
static_assert(sizeof(ncclUniqueId) == sizeof(unique_id) && NCCL_UNIQUE_ID_BYTES == 128);
static_assert(ncclSuccess == success && ncclBfloat16 == bfloat16);
#endif

struct api {
  void* handle = nullptr;
  std::string path;  // the file loaded
  std::string why;   // why none was loaded
  int version = 0;   // ncclGetVersion's: 22703 for 2.27.3

  result_t (*get_version)(int*) = nullptr;
  result_t (*get_unique_id)(unique_id*) = nullptr;
  result_t (*comm_init_rank)(comm_t*, int, unique_id, int) = nullptr;
  result_t (*comm_destroy)(comm_t) = nullptr;
  result_t (*broadcast)(const void*, void*, std::size_t, int, int, comm_t, cudaStream_t) = nullptr;
  result_t (*group_start)() = nullptr;
  result_t (*group_end)() = nullptr;
  const char* (*error_string)(result_t) = nullptr;

  bool loaded() const noexcept { return handle != nullptr; }

  void check(result_t r, const char* what) const {
    if (r != success) throw std::runtime_error(std::string(what) + ": " + (error_string ? error_string(r) : "?"));
  }
};

namespace detail {

// libnccl.so* under python3's `nvidia` package folders, or empty.
inline std::string from_python() {
  FILE* p = ::popen(
      "python3 -c 'import glob, os, nvidia\n"
      "for d in nvidia.__path__:\n"
      "    for f in sorted(glob.glob(os.path.join(d, \"**\", \"libnccl.so*\"), recursive=True)):\n"
      "        print(f); raise SystemExit\n' 2>/dev/null",
      "r");
  if (!p) return {};
  char line[4096];
  std::string out;
  if (std::fgets(line, sizeof line, p)) out = line;
  ::pclose(p);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

template <class F>
bool bind(void* h, const char* name, F& f) {
  f = reinterpret_cast<F>(::dlsym(h, name));
  return f != nullptr;
}

}  // namespace detail

/// Loads NCCL as the header's comment says. Never throws: api::why says what failed.
inline api load() {
  // NVLink multicast (NVLS) can take the host's GPUs out of service on the lent machines:
  // off, whatever the environment says, here and in every process started from here.
  ::setenv("NCCL_NVLS_ENABLE", "0", 1);
  api a;
  std::string tried;
  const auto attempt = [&](const std::string& file) {
    if (file.empty() || a.handle) return;
    a.handle = ::dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (a.handle) {
      a.path = file;
      return;
    }
    const char* e = ::dlerror();
    tried += (tried.empty() ? "" : "; ") + std::string(e ? e : file + ": dlopen failed");
  };
  if (const char* env = std::getenv("SHARDLINE_NCCL_LIBRARY"); env && *env) {
    attempt(env);
  } else {
    attempt("libnccl.so.2");
    if (!a.handle) {
      const auto py = detail::from_python();
      if (py.empty()) tried += "; no libnccl.so* in python3's nvidia packages";
      attempt(py);
    }
  }
  if (!a.handle) {
    a.why = tried;
    return a;
  }
  const bool ok = detail::bind(a.handle, "ncclGetVersion", a.get_version) &&
                  detail::bind(a.handle, "ncclGetUniqueId", a.get_unique_id) &&
                  detail::bind(a.handle, "ncclCommInitRank", a.comm_init_rank) &&
                  detail::bind(a.handle, "ncclCommDestroy", a.comm_destroy) &&
                  detail::bind(a.handle, "ncclBroadcast", a.broadcast) &&
                  detail::bind(a.handle, "ncclGroupStart", a.group_start) &&
                  detail::bind(a.handle, "ncclGroupEnd", a.group_end) &&
                  detail::bind(a.handle, "ncclGetErrorString", a.error_string);
  if (ok && a.get_version(&a.version) == success && a.version >= 21900) {
    ::setenv("SHARDLINE_NCCL_LIBRARY", a.path.c_str(), 1);
    return a;
  }
  a.why = a.path + (ok ? ": NCCL " + std::to_string(a.version) + " is older than 2.19" : ": a symbol is missing");
  ::dlclose(a.handle);
  a.handle = nullptr;
  return a;
}

}  // namespace nccl_dl
