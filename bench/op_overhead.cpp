// op_overhead: what one awaited write costs on the loopback transport, against a raw
// asio::post callback chain doing the same copy, in one run; and where the cost goes.
//
//   bench_op_overhead [--writes N] [--bytes B] [--repetitions R] [--json]
//
// `op_overhead` (the JSON result) is the library's cheapest documented way to await one
// operation: a coroutine of asio::awaitable<void, io_context::executor_type> doing
// co_await async_write(use_frameless_awaitable_t<io_context::executor_type>{}) on a
// basic_loopback_transport<io_context::executor_type>, whose completion goes through
// detail::post_completion's same-executor fast path. The table adds, against the same
// baseline:
//   - the old headline, co_await async_write(use_awaitable) on loopback_transport
//     (any_io_executor), and the other combinations of token and executor: the custom
//     awaitable (use_frameless_awaitable) against use_awaitable's per-operation coroutine
//     over the same allocator-aware op (the "measure which" of the issue);
//   - as_tuple(...) of both tokens and redirect_error(use_awaitable): no exception on error;
//   - the same write completing to a plain callback chain (no coroutine at all);
//   - the coroutine round trip alone, on an initiation that only posts its handler: through
//     post_completion (no work_dispatcher when the executors match) and through a plain
//     asio::post of the handler (Asio adds its work_dispatcher hop), which is what the fast
//     path saves.
// Every variant does `writes` 64-byte writes, one at a time, each awaited (or chained) before
// the next. The cost is the thread's CPU time per write (CLOCK_THREAD_CPUTIME_ID: all of it
// runs on this one thread and never blocks, and CPU time does not count the time the
// shared machine gives to others); median of `repetitions` rounds, the variants
// interleaved within each round.
#include <shardline/async/use_frameless_awaitable.hpp>
#include <shardline/detail/completion.hpp>
#include <shardline/error.hpp>
#include <shardline/transport/loopback.hpp>

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/append.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/redirect_error.hpp>
#include <asio/use_awaitable.hpp>

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace sl = shardline;

namespace {

using typed_executor = asio::io_context::executor_type;
using erased_executor = asio::any_io_executor;

template <class Executor>
using frameless = sl::use_frameless_awaitable_t<Executor>;
template <class Executor>
using awaitable_token = asio::use_awaitable_t<Executor>;

// A write per iteration, awaited with `Token`; a failed write throws.
template <class Executor, class Token, class Conn>
asio::awaitable<void, Executor> awaited_writes(Conn& conn, sl::write_request request, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    co_await conn.async_write(std::span<const sl::write_request>(&request, 1), Token{});
}

// The same, the code coming back as a tuple.
template <class Executor, class Token, class Conn>
asio::awaitable<void, Executor> awaited_writes_as_tuple(Conn& conn, sl::write_request request, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    auto [ec] = co_await conn.async_write(std::span<const sl::write_request>(&request, 1),
                                          asio::experimental::as_tuple(Token{}));
    if (ec) throw sl::error(ec, "op_overhead: write failed");
  }
}

asio::awaitable<void> awaited_redirect(sl::loopback_transport::connection& conn, sl::write_request request,
                                       std::size_t n) {
  std::error_code ec;
  for (std::size_t i = 0; i < n; ++i) {
    co_await conn.async_write(std::span<const sl::write_request>(&request, 1),
                              asio::redirect_error(asio::use_awaitable, ec));
    if (ec) throw sl::error(ec, "op_overhead: write failed");
  }
}

// An operation that only completes: through the library's post_completion, or through a
// plain asio::post of the handler (Asio then adds its work_dispatcher hop, because a
// coroutine's handler has an associated executor of its own).
template <class Token>
auto async_post_completion(const typed_executor& io, Token&& token) {
  return asio::async_initiate<Token, void(std::error_code)>(
      [io](auto handler) { sl::detail::post_completion(io, std::move(handler), std::error_code{}); }, token);
}

template <class Token>
auto async_plain_post(const typed_executor& io, Token&& token) {
  return asio::async_initiate<Token, void(std::error_code)>(
      [io](auto handler) { asio::post(io, asio::experimental::append(std::move(handler), std::error_code{})); },
      token);
}

template <class Token>
asio::awaitable<void, typed_executor> bare_post_completion(typed_executor io, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) co_await async_post_completion(io, Token{});
}

template <class Token>
asio::awaitable<void, typed_executor> bare_plain_post(typed_executor io, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) co_await async_plain_post(io, Token{});
}

template <class Conn>
struct callback_chain {
  Conn* conn;
  sl::write_request request;
  std::size_t remaining;
  void operator()(std::error_code ec) {
    if (ec) throw sl::error(ec, "op_overhead: write failed");
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

double thread_cpu_ns() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e9 + static_cast<double>(t.tv_nsec);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// One receiver with one exposed region and a connection to it, on transport type T.
template <class T>
struct endpoint_pair {
  endpoint_pair(asio::io_context& io, std::span<std::byte> source)
      : transport(typename T::executor_type(io.get_executor())), receiver(transport.get_executor()) {
    arena = receiver.allocate(source.size());
    receiver.expose("p", arena);
    conn.emplace(transport.connect(receiver));
    request = sl::make_write(transport.register_memory(source).region(), source, *conn->remote_regions().find("p"));
  }
  T transport;
  typename T::receiver receiver;
  std::span<std::byte> arena;
  std::optional<typename T::connection> conn;
  sl::write_request request;
};

}  // namespace

int main(int argc, char** argv) {
  std::size_t writes = 200000, bytes = 64;
  int repetitions = 9;
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
  std::vector<std::byte> source(bytes, std::byte{7}), raw_destination(bytes);
  endpoint_pair<sl::loopback_transport> erased(io, source);
  endpoint_pair<sl::basic_loopback_transport<typed_executor>> typed(io, source);
  auto& conn = *erased.conn;
  auto& typed_conn = *typed.conn;
  using erased_conn_type = sl::loopback_transport::connection;
  using typed_conn_type = sl::basic_loopback_transport<typed_executor>::connection;
  const auto request = erased.request;
  const auto typed_request = typed.request;
  const typed_executor ex = io.get_executor();

  struct variant {
    variant(const char* l, std::function<void()> s) : label(l), start(std::move(s)) {}
    const char* label;
    std::function<void()> start;
    std::vector<double> ns;
  };
  // The first two rows are the baseline and the headline.
  std::vector<variant> variants = {
      {"raw asio::post chain", [&] {
         asio::post(io, raw_chain{io, raw_destination.data(), source.data(), bytes, writes});
       }},
      {"typed, use_frameless_awaitable", [&] {
         asio::co_spawn(io, awaited_writes<typed_executor, frameless<typed_executor>>(typed_conn, typed_request, writes),
                        asio::detached);
       }},
      {"typed, use_awaitable", [&] {
         asio::co_spawn(io, awaited_writes<typed_executor, awaitable_token<typed_executor>>(typed_conn, typed_request,
                                                                                            writes),
                        asio::detached);
       }},
      {"typed, as_tuple(frameless)", [&] {
         asio::co_spawn(io, awaited_writes_as_tuple<typed_executor, frameless<typed_executor>>(typed_conn, typed_request,
                                                                                               writes),
                        asio::detached);
       }},
      {"typed, as_tuple(use_awaitable)", [&] {
         asio::co_spawn(io, awaited_writes_as_tuple<typed_executor, awaitable_token<typed_executor>>(
                                typed_conn, typed_request, writes),
                        asio::detached);
       }},
      {"typed, plain callback", [&] {
         typed_conn.async_write(std::span<const sl::write_request>(&typed_request, 1),
                                callback_chain<typed_conn_type>{&typed_conn, typed_request, writes});
       }},
      {"any_io, use_awaitable (old)", [&] {
         asio::co_spawn(io, awaited_writes<erased_executor, awaitable_token<erased_executor>>(conn, request, writes),
                        asio::detached);
       }},
      {"any_io, use_frameless_awaitable", [&] {
         asio::co_spawn(io, awaited_writes<erased_executor, frameless<erased_executor>>(conn, request, writes),
                        asio::detached);
       }},
      {"any_io, as_tuple(use_awaitable)", [&] {
         asio::co_spawn(io, awaited_writes_as_tuple<erased_executor, awaitable_token<erased_executor>>(conn, request,
                                                                                                       writes),
                        asio::detached);
       }},
      {"any_io, redirect_error", [&] { asio::co_spawn(io, awaited_redirect(conn, request, writes), asio::detached); }},
      {"any_io, plain callback", [&] {
         conn.async_write(std::span<const sl::write_request>(&request, 1),
                          callback_chain<erased_conn_type>{&conn, request, writes});
       }},
      {"bare post_completion, frameless", [&] {
         asio::co_spawn(io, bare_post_completion<frameless<typed_executor>>(ex, writes), asio::detached);
       }},
      {"bare asio::post (w_d), frameless", [&] {
         asio::co_spawn(io, bare_plain_post<frameless<typed_executor>>(ex, writes), asio::detached);
       }},
      {"bare post_completion, use_awaitable", [&] {
         asio::co_spawn(io, bare_post_completion<awaitable_token<typed_executor>>(ex, writes), asio::detached);
       }},
      {"bare asio::post (w_d), use_awaitable", [&] {
         asio::co_spawn(io, bare_plain_post<awaitable_token<typed_executor>>(ex, writes), asio::detached);
       }},
  };
  for (int rep = 0; rep < repetitions; ++rep)
    for (auto& v : variants) {
      io.restart();
      const double start = thread_cpu_ns();
      v.start();
      io.run();
      v.ns.push_back((thread_cpu_ns() - start) / static_cast<double>(writes));
    }
  if (std::memcmp(erased.arena.data(), source.data(), bytes) != 0 ||
      std::memcmp(typed.arena.data(), source.data(), bytes) != 0) {
    std::fprintf(stderr, "bench_op_overhead: the loopback writes did not land\n");
    return 1;
  }
  const double raw = median(variants[0].ns), ours = median(variants[1].ns);
  if (json) {
    std::printf("{\"name\":\"op_overhead\",\"value\":%.2f,\"unit\":\"ns/op\",\"baseline\":%.2f,"
                "\"ratio\":%.3f}\n", ours, raw, ours / raw);
    return 0;
  }
  std::printf("op_overhead: %zu awaited %zu-byte writes on loopback vs a raw asio::post chain "
              "doing the same memcpy, thread CPU ns per write, median of %d%s\n", writes, bytes, repetitions,
              SHARDLINE_HAS_FRAMELESS_AWAITABLE ? "" : " (use_frameless_awaitable is use_awaitable here)");
  std::printf("  %-36s %12s %14s %8s\n", "result", "value ns/op", "baseline ns/op", "ratio");
  std::printf("  %-36s %12.1f %14.1f %8.3f\n", "op_overhead: typed, frameless", ours, raw, ours / raw);
  std::printf("attribution (same baseline):\n");
  for (std::size_t i = 2; i < variants.size(); ++i) {
    const double v = median(variants[i].ns);
    std::printf("  %-36s %12.1f %14.1f %8.3f\n", variants[i].label, v, raw, v / raw);
  }
  return 0;
}
