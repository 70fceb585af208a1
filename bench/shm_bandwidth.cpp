// shm_bandwidth: throughput of the shm transport into a forked receiver process, against a
// single-threaded std::memcpy of the same bytes between two buffers of this process.
//
//   bench_shm_bandwidth [--bytes N] [--write-bytes N] [--repetitions N] [--threads N]
//                       [--chunk-bytes N] [--json]
//
// Sizes take K/M/G suffixes (binary). Every page of every buffer (the receiver's arena, the
// sender's mapping of it, the source and both memcpy buffers) is faulted in before timing,
// and each side gets one untimed pass; then the two alternate, pass for pass, so that a
// busy host slows both alike. The figures are medians over the repetitions.
#include <shardline/transport/shm/transport.hpp>

#include <asio/io_context.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

namespace sl = shardline;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

struct options {
  std::size_t bytes = std::size_t(1) << 30;
  std::size_t write_bytes = std::size_t(64) << 20;
  int repetitions = 5;
  std::size_t threads = 2;
  std::size_t chunk_bytes = shardline::shm_options{}.chunk_bytes;
  bool json = false;
};

std::size_t parse_bytes(const std::string& s) {
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  switch (end && *end ? *end : ' ') {
    case 'K': case 'k': v *= 1024; break;
    case 'M': case 'm': v *= 1024 * 1024; break;
    case 'G': case 'g': v *= 1024.0 * 1024 * 1024; break;
    default: break;
  }
  if (v < 1) throw std::invalid_argument("size '" + s + "' must be at least 1 byte");
  return static_cast<std::size_t>(v);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void touch(std::span<std::byte> s, std::byte value) {
  for (std::size_t i = 0; i < s.size(); i += 4096) s[i] = value;
  if (!s.empty()) s.back() = value;
}

int receive(const options& o, const std::string& path) {
  asio::io_context io;
  sl::shm_transport::receiver r(io.get_executor(), path);
  auto arena = r.allocate(o.bytes);
  touch(arena, std::byte{1});  // the pages exist before the sender maps them
  r.expose("w", arena);
  bool done = false;
  int verdict = 4;  // no commit notice came
  r.async_accept([&](std::error_code ec, std::uint32_t) {
    if (ec) {
      std::fprintf(stderr, "shm_bandwidth receiver: accept: %s\n", ec.message().c_str());
      done = true;
      return;
    }
    // The sender's commit notice: every byte of the last pass is here.
    r.async_wait_notification([&](std::error_code ec, sl::notice n) {
      done = true;
      if (ec || n.kind != sl::notice_kind::commit) return;
      verdict = 0;
      for (std::size_t i = 0; i < arena.size(); ++i)
        if (arena[i] != static_cast<std::byte>(i * 131)) {
          verdict = 3;
          break;
        }
    });
  });
  const auto deadline = clock_type::now() + 600s;
  while (!done && clock_type::now() < deadline) io.run_one_for(100ms);
  return verdict;
}

// Seconds for one pass of every write, all in flight at once.
double shm_pass(asio::io_context& io, sl::shm_transport::connection& c,
                const std::vector<std::vector<sl::write_request>>& writes) {
  std::size_t done = 0;
  std::error_code failure;
  const auto start = clock_type::now();
  for (const auto& w : writes)
    c.async_write(w, [&](std::error_code ec) {
      if (ec) failure = ec;
      ++done;
    });
  while (done < writes.size()) io.run_one();
  const double s = std::chrono::duration<double>(clock_type::now() - start).count();
  if (failure) throw sl::error(failure, "shm_bandwidth: write failed");
  return s;
}

double memcpy_pass(std::byte* dst, const std::byte* src, const options& o) {
  const auto start = clock_type::now();
  for (std::size_t off = 0; off < o.bytes; off += o.write_bytes)
    std::memcpy(dst + off, src + off, std::min(o.write_bytes, o.bytes - off));
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--json") o.json = true;
      else if (a == "--bytes" && i + 1 < argc) o.bytes = parse_bytes(argv[++i]);
      else if (a == "--write-bytes" && i + 1 < argc) o.write_bytes = parse_bytes(argv[++i]);
      else if (a == "--repetitions" && i + 1 < argc) o.repetitions = std::max(1, std::atoi(argv[++i]));
      else if (a == "--chunk-bytes" && i + 1 < argc) o.chunk_bytes = parse_bytes(argv[++i]);
      else if (a == "--threads" && i + 1 < argc) o.threads = std::max(1, std::atoi(argv[++i]));
      else throw std::invalid_argument("unknown argument '" + a + "'");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_shm_bandwidth: %s\nusage: bench_shm_bandwidth [--bytes N] "
                         "[--write-bytes N] [--repetitions N] [--threads N] [--chunk-bytes N] [--json]\n", e.what());
    return 2;
  }
  o.write_bytes = std::min(o.write_bytes, o.bytes);
  const std::string path = "/tmp/shardline-bench-shm-" + std::to_string(getpid()) + ".sock";

  // Fork before this process owns any thread or io_context.
  const pid_t child = fork();
  if (child < 0) {
    std::perror("fork");
    return 1;
  }
  if (child == 0) _exit(receive(o, path));

  std::vector<double> shm_s, memcpy_s;
  try {
    std::vector<std::byte> src(o.bytes);
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>(i * 131);

    asio::io_context io;
    sl::shm_options so;
    so.copy_threads = o.threads;
    so.chunk_bytes = o.chunk_bytes;
    sl::shm_transport transport(io.get_executor(), so);
    std::optional<sl::shm_transport::connection> conn;
    for (int attempt = 0; !conn; ++attempt) {
      std::optional<std::error_code> result;
      transport.async_connect(path, [&](std::error_code ec, sl::shm_transport::connection c) {
        result = ec;
        if (!ec) conn.emplace(std::move(c));
      });
      while (!result) io.run_one();
      if (*result && attempt > 500) throw sl::error(*result, "connect to the receiver at " + path);
      if (*result) std::this_thread::sleep_for(10ms);
    }
    const auto& w = *conn->remote_regions().find("w");
    auto reg = transport.register_memory(src);
    std::vector<std::vector<sl::write_request>> writes;
    for (std::size_t off = 0; off < o.bytes; off += o.write_bytes)
      writes.push_back({sl::make_write(reg.region(), std::span(src).subspan(off, std::min(o.write_bytes, o.bytes - off)), w, off)});

    std::vector<std::byte> dst(o.bytes);
    touch(dst, std::byte{1});

    // One untimed pass each, then alternate, so that both see the same load of the host.
    shm_pass(io, *conn, writes);
    memcpy_pass(dst.data(), src.data(), o);
    for (int r = 0; r < o.repetitions; ++r) {
      shm_s.push_back(shm_pass(io, *conn, writes));
      memcpy_s.push_back(memcpy_pass(dst.data(), src.data(), o));
    }
    if (std::memcmp(dst.data(), src.data(), o.bytes) != 0) throw std::runtime_error("memcpy baseline differs");

    std::optional<std::error_code> notified;  // the receiver then checks every byte
    conn->async_notify(sl::notice_kind::commit, 1, [&](std::error_code ec) { notified = ec; });
    while (!notified) io.run_one();
    if (*notified) throw sl::error(*notified, "shm_bandwidth: commit notice");

    conn->close();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_shm_bandwidth: %s\n", e.what());
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
    return 1;
  }
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "bench_shm_bandwidth: the receiver found wrong bytes (status %d)\n", status);
    return 1;
  }

  const double gb = o.bytes / 1e9;
  const double shm = gb / median(shm_s), base = gb / median(memcpy_s);
  if (o.json) {
    std::printf("{\"name\":\"shm_bandwidth\",\"value\":%.3f,\"unit\":\"GB/s\",\"baseline\":%.3f,"
                "\"ratio\":%.4f}\n", shm, base, shm / base);
    return 0;
  }
  std::printf("shm_bandwidth: %.0f MiB as %zu writes of %.0f MiB, %zu copy thread(s), %.1f MiB "
              "chunks, median of %d\n", o.bytes / 1048576.0, (o.bytes + o.write_bytes - 1) / o.write_bytes,
              o.write_bytes / 1048576.0, o.threads, o.chunk_bytes / 1048576.0, o.repetitions);
  std::printf("  %-34s %10s %10s\n", "path", "GB/s", "ms");
  std::printf("  %-34s %10.2f %10.1f\n", "shm transport -> receiver process", shm, median(shm_s) * 1e3);
  std::printf("  %-34s %10.2f %10.1f\n", "memcpy, one thread, same process", base, median(memcpy_s) * 1e3);
  std::printf("  ratio shm / memcpy: %.3f (goal >= 0.9)\n", shm / base);
  return 0;
}
