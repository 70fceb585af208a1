// op_overhead: what one awaited write costs on the loopback transport, against a raw
// asio::post callback chain doing the same copy, in one run.
//
//   bench_op_overhead [--writes N] [--bytes B] [--repetitions R] [--json]
#include <shardline/loopback_transport.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace sl = shardline;
using clock_type = std::chrono::steady_clock;

namespace {

asio::awaitable<void> awaited_writes(sl::loopback_transport::connection& conn,
                                     sl::write_request request, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    co_await conn.async_write(std::span<const sl::write_request>(&request, 1), asio::use_awaitable);
}

// Attribution rows (table only): the same write completing to a plain callback, and a
// bare co_await of asio::post, show how much of the cost is the coroutine round trip.
asio::awaitable<void> awaited_posts(asio::io_context& io, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) co_await asio::post(io, asio::use_awaitable);
}

struct callback_chain {
  sl::loopback_transport::connection* conn;
  sl::write_request request;
  std::size_t remaining;
  void operator()(std::error_code) {
    if (--remaining) conn->async_write(std::span<const sl::write_request>(&request, 1), *this);
  }
};

// The baseline: each step copies and posts the next, the least an event loop can do.
struct raw_chain {
  asio::io_context& io;
  std::byte* destination;
  const std::byte* source;
  std::size_t bytes;
  std::size_t remaining;
  void operator()() {
    std::memcpy(destination, source, bytes);
    if (--remaining) asio::post(io, *this);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t writes = 200000, bytes = 64;
  int repetitions = 5;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") json = true;
    else if (a == "--writes" && i + 1 < argc) writes = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--bytes" && i + 1 < argc) bytes = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--repetitions" && i + 1 < argc) repetitions = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: bench_op_overhead [--writes N] [--bytes B] [--repetitions R] [--json]\n");
      return 2;
    }
  }
  if (writes == 0 || bytes == 0) {
    std::fprintf(stderr, "bench_op_overhead: --writes and --bytes must be positive\n");
    return 2;
  }

  asio::io_context io;
  sl::loopback_transport transport(io.get_executor());
  sl::loopback_transport::receiver receiver(io.get_executor());
  auto arena = receiver.allocate(bytes);
  receiver.expose("p", arena);
  auto conn = transport.connect(receiver);
  std::vector<std::byte> source(bytes, std::byte{7}), raw_destination(bytes);
  const auto request = sl::make_write(transport.register_memory(source).region(), source,
                                      *conn.remote_regions().find("p"));

  std::vector<double> ours, raw, callback, bare_await;
  auto per_op = [writes](clock_type::time_point start) {
    return std::chrono::duration<double, std::nano>(clock_type::now() - start).count() / writes;
  };
  for (int rep = 0; rep < repetitions; ++rep) {
    io.restart();
    auto start = clock_type::now();
    asio::co_spawn(io, awaited_writes(conn, request, writes), asio::detached);
    io.run();
    ours.push_back(per_op(start));

    io.restart();
    start = clock_type::now();
    asio::post(io, raw_chain{io, raw_destination.data(), source.data(), bytes, writes});
    io.run();
    raw.push_back(per_op(start));
    if (json) continue;

    io.restart();
    start = clock_type::now();
    conn.async_write(std::span<const sl::write_request>(&request, 1),
                     callback_chain{&conn, request, writes});
    io.run();
    callback.push_back(per_op(start));

    io.restart();
    start = clock_type::now();
    asio::co_spawn(io, awaited_posts(io, writes), asio::detached);
    io.run();
    bare_await.push_back(per_op(start));
  }
  if (std::memcmp(arena.data(), source.data(), bytes) != 0) {
    std::fprintf(stderr, "bench_op_overhead: the loopback writes did not land\n");
    return 1;
  }
  const double o = median(ours), r = median(raw);
  if (json) {
    std::printf("{\"name\":\"op_overhead\",\"value\":%.2f,\"unit\":\"ns/op\",\"baseline\":%.2f,"
                "\"ratio\":%.3f}\n", o, r, o / r);
    return 0;
  }
  std::printf("op_overhead: %zu awaited %zu-byte writes on loopback vs a raw asio::post chain "
              "doing the same memcpy, median of %d\n", writes, bytes, repetitions);
  std::printf("  %-26s %12s %14s %8s\n", "result", "value ns/op", "baseline ns/op", "ratio");
  std::printf("  %-26s %12.1f %14.1f %8.3f\n", "op_overhead", o, r, o / r);
  std::printf("attribution (same baseline):\n");
  const double c = median(callback), a = median(bare_await);
  std::printf("  %-26s %12.1f %14.1f %8.3f\n", "write, plain callback", c, r, c / r);
  std::printf("  %-26s %12.1f %14.1f %8.3f\n", "co_await asio::post only", a, r, a / r);
  return 0;
}
