// bench_verbs: shardline's verbs transport measured the way perftest measures the device.
//
//   bench_verbs [--device rxe0] [--address 127.0.0.2] [--port 18600]
//               [--bw-writes 300] [--bw-depth 64] [--rate-writes 20000] [--rate-batch 16]
//               [--rate-depth 8] [--lat-writes 2000] [--connects 20] [--qps N]
//               [--poll adaptive|busy|event] [--only bw|rate|lat|connect]
//               [--memory-windows auto|off]
//
// --poll picks the transport's compile-time CQ polling mode (adaptive is the default);
// --qps its queue pairs per peer; --memory-windows the transports' options::memory_windows
// (auto: windows where the device has them). A receiver and a sender in this one process,
// one io_context, connected through the device's RoCE GID of --address (tests/rxe/run runs
// it inside the Soft-RoCE VM next to ib_write_bw / ib_write_lat on the same rxe0):
//   bw_1m   1 MiB writes, --bw-depth async_writes in flight (ib_write_bw's tx-depth);
//   rate_4k 4 KiB writes, --rate-batch per async_write (one chained post), --rate-depth
//           batches in flight;
//   lat_8b  one 8-byte async_write at a time awaited by a coroutine; the median of
//           --lat-writes. ib_write_lat reports half a ping-pong round trip; ours is the time
//           until the write's completion (the ACK came back): close to a full round trip.
//   connect --connects handshakes (TCP, hello, verdict, QP exchange, region table and, where
//           the receiver binds memory windows, their binding) to a receiver holding
//           options::key, alternating with as many to a receiver that runs without one
//           (allow_unauthenticated), both exposing the same table; the median of each, from
//           async_connect to both ends done. Each connection is closed, and its end seen by
//           the receiver, before the next. The key's cost is the difference: it is paid once
//           per connection, never per write.
// Every phase checks afterwards that the receiver's memory holds what was sent.
// Output: human lines, and one "METRIC <name> <value> <unit>" line per result for the
// harness. MB = 2^20 bytes, as perftest counts.
#include <shardline/verbs.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace sl = shardline;
using clock_type = std::chrono::steady_clock;

namespace {

struct options {
  std::string device = "rxe0";
  std::string address = "127.0.0.2";
  unsigned short port = 18600;
  std::size_t bw_writes = 300;
  std::size_t bw_depth = 64;
  std::size_t rate_writes = 20000;
  std::size_t rate_batch = 16;
  std::size_t rate_depth = 8;
  std::size_t lat_writes = 2000;
  std::size_t connects = 20;
  std::size_t queue_pairs = 0;  // 0: the transport's default
  std::string poll = "adaptive";
  std::string only;
  std::string windows = "auto";
};

constexpr std::size_t mib = 1u << 20;
constexpr std::size_t bw_size = mib;
constexpr std::size_t bw_slots = 16;  // 16 MiB each side: writes cycle through the slots
constexpr std::size_t rate_size = 4096;
constexpr std::size_t rate_slots = 256;
constexpr std::size_t lat_size = 8;

// The bytes of slot `slot` in round `round`: differs per round so a phase that wrote
// nothing cannot pass the check with the previous phase's bytes.
void fill(std::span<std::byte> bytes, std::size_t slot, std::size_t round) {
  for (std::size_t i = 0; i < bytes.size(); i += 8) {
    const std::uint64_t v = (std::uint64_t(round) << 48) ^ (std::uint64_t(slot) << 32) ^ i;
    std::memcpy(bytes.data() + i, &v, std::min<std::size_t>(8, bytes.size() - i));
  }
}

// State shared by the writers of one throughput phase. Writers are coroutine functions
// taking their parameters by value (g++ 12 mishandles coroutine lambdas with captures).
template <class T>
struct phase {
  typename T::connection* connection = nullptr;
  std::vector<sl::write_request> requests;  // one per slot
  std::size_t batch = 1;                    // requests per async_write
  std::size_t total = 0;                    // requests to write in all
  std::size_t issued = 0;
  std::size_t completed = 0;
  std::size_t exited = 0;  // writers that returned
  std::error_code error;
};

template <class T>
asio::awaitable<void> writer(phase<T>* p) {
  const std::size_t slots = p->requests.size();
  while (!p->error && p->issued < p->total) {
    const std::size_t first = p->issued % slots;
    const std::size_t n = std::min({p->batch, p->total - p->issued, slots - first});
    p->issued += n;
    auto [ec] = co_await p->connection->async_write(
        std::span<const sl::write_request>(p->requests).subspan(first, n),
        asio::experimental::as_tuple(asio::use_awaitable));
    if (ec && !p->error) p->error = ec;
    p->completed += n;
  }
  ++p->exited;
}

// Runs the io_context until `done()`. The transport keeps work outstanding (its CQ poller
// waits on the completion channel), so run() would never return; a bound keeps a lost
// completion from hanging the benchmark.
template <class Done>
void run_until(asio::io_context& io, const char* what, Done done) {
  const auto deadline = clock_type::now() + std::chrono::seconds(300);
  io.restart();
  while (!done()) {
    if (io.run_one_until(deadline) != 0) continue;
    if (io.stopped()) throw std::runtime_error(std::string(what) + ": ran out of work unfinished");
    if (clock_type::now() >= deadline)
      throw std::runtime_error(std::string(what) + ": not finished after 300 s");
  }
}

// Runs `depth` writers over the phase; returns the seconds from first post to last completion.
template <class T>
double run_phase(asio::io_context& io, const char* what, phase<T>& p, std::size_t depth) {
  const auto start = clock_type::now();
  for (std::size_t i = 0; i < depth; ++i) asio::co_spawn(io, writer<T>(&p), asio::detached);
  run_until(io, what, [&] { return p.exited == depth; });
  const double s = std::chrono::duration<double>(clock_type::now() - start).count();
  if (p.error) throw sl::error(p.error, std::string(what) + ": write failed: " + p.error.message());
  if (p.completed != p.total)
    throw std::runtime_error(std::string(what) + ": stopped after " +
                             std::to_string(p.completed) + " of " + std::to_string(p.total) +
                             " writes");
  return s;
}

bool same(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

template <class T>
asio::awaitable<void> latency_loop(typename T::connection* c, sl::write_request w,
                                   std::size_t n, std::vector<double>* samples,
                                   std::error_code* error, bool* done) {
  for (std::size_t i = 0; i < n; ++i) {
    const auto t0 = clock_type::now();
    auto [ec] = co_await c->async_write(std::span<const sl::write_request>(&w, 1),
                                        asio::experimental::as_tuple(asio::use_awaitable));
    const auto t1 = clock_type::now();
    if (ec) {
      *error = ec;
      break;
    }
    samples->push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  *done = true;
}

template <class T>
asio::awaitable<void> accept(typename T::receiver* r, std::error_code* error,
                             bool* done) {
  auto [ec, sender] = co_await r->async_accept(asio::experimental::as_tuple(asio::use_awaitable));
  (void)sender;
  *error = ec;
  *done = true;
}

template <class T>
asio::awaitable<void> connect(T* t, asio::ip::tcp::endpoint endpoint, sl::sender_identity who,
                              std::optional<typename T::connection>* out,
                              std::error_code* error, bool* done) {
  auto [ec, c] =
      co_await t->async_connect(endpoint, who, asio::experimental::as_tuple(asio::use_awaitable));
  *error = ec;
  if (!ec) out->emplace(std::move(c));
  *done = true;
}

// One handshake of sender `id` with `r`: milliseconds from async_connect until both ends
// completed. The connection is then closed, and the receiver has seen it go, on return.
template <class T>
double timed_connect(asio::io_context& io, T& t, typename T::receiver& r, std::uint32_t id) {
  std::error_code accept_ec, connect_ec;
  bool accepted = false, connected = false;
  std::optional<typename T::connection> c;
  const auto start = clock_type::now();
  asio::co_spawn(io, accept<T>(&r, &accept_ec, &accepted), asio::detached);
  asio::co_spawn(io, connect<T>(&t, r.local_endpoint(), sl::sender_identity{id, 0}, &c, &connect_ec, &connected),
                 asio::detached);
  run_until(io, "connect", [&] { return accepted && connected; });
  const double ms = std::chrono::duration<double, std::milli>(clock_type::now() - start).count();
  if (accept_ec) throw sl::error(accept_ec, "connect: accept failed: " + accept_ec.message());
  if (connect_ec) throw sl::error(connect_ec, "connect: async_connect failed: " + connect_ec.message());
  bool gone = false;
  r.async_wait_notification([&](std::error_code, sl::notice) { gone = true; });
  c->close();
  run_until(io, "connect", [&] { return gone; });
  return ms;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::size_t number(const std::string& flag, const char* v) {
  char* end = nullptr;
  const unsigned long long n = std::strtoull(v, &end, 10);
  if (!*v || *end || n == 0)
    throw std::invalid_argument(flag + " must be a positive integer, not '" + v + "'");
  return static_cast<std::size_t>(n);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      std::puts("usage: bench_verbs [--device rxe0] [--address 127.0.0.2] [--port 18600]\n"
                "       [--bw-writes N] [--bw-depth N] [--rate-writes N] [--rate-batch N]\n"
                "       [--rate-depth N] [--lat-writes N] [--connects N] [--qps N]\n"
                "       [--poll adaptive|busy|event] [--only bw|rate|lat|connect]\n"
                "       [--memory-windows auto|off]");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument(k + " needs a value");
    const char* v = argv[++i];
    if (k == "--device") o.device = v;
    else if (k == "--address") o.address = v;
    else if (k == "--port") o.port = static_cast<unsigned short>(number(k, v));
    else if (k == "--bw-writes") o.bw_writes = number(k, v);
    else if (k == "--bw-depth") o.bw_depth = number(k, v);
    else if (k == "--rate-writes") o.rate_writes = number(k, v);
    else if (k == "--rate-batch") o.rate_batch = number(k, v);
    else if (k == "--rate-depth") o.rate_depth = number(k, v);
    else if (k == "--lat-writes") o.lat_writes = number(k, v);
    else if (k == "--connects") o.connects = number(k, v);
    else if (k == "--qps") o.queue_pairs = number(k, v);
    else if (k == "--poll") o.poll = v;
    else if (k == "--only") o.only = v;
    else if (k == "--memory-windows") o.windows = v;
    else throw std::invalid_argument("unknown argument '" + k + "'");
  }
  if (!o.only.empty() && o.only != "bw" && o.only != "rate" && o.only != "lat" && o.only != "connect")
    throw std::invalid_argument("--only must be bw, rate, lat or connect, not '" + o.only + "'");
  if (o.windows != "auto" && o.windows != "off")
    throw std::invalid_argument("--memory-windows must be auto or off, not '" + o.windows + "'");
  if (o.poll != "adaptive" && o.poll != "busy" && o.poll != "event")
    throw std::invalid_argument("--poll must be adaptive, busy or event, not '" + o.poll + "'");
  return o;
}

template <sl::verbs::poll_mode Mode>
int run(const options& o) {
  using T = sl::verbs::basic_verbs_transport<Mode>;
  asio::io_context io;
  sl::verbs::options vo;
  vo.key = sl::shared_key::generate();  // sender and receiver are this process
  vo.device = o.device;
  if (o.queue_pairs) vo.queue_pairs = o.queue_pairs;
  if (o.windows == "off") vo.memory_windows = sl::verbs::memory_window_use::off;
  T t(io.get_executor(), vo);
  const asio::ip::tcp::endpoint endpoint(asio::ip::make_address(o.address), o.port);
  typename T::receiver r(t, endpoint);

  // The receiver registers its arena once; each phase writes into its own exposed region.
  auto arena = r.allocate(bw_slots * bw_size + rate_slots * rate_size + lat_size);
  auto bw_remote = arena.subspan(0, bw_slots * bw_size);
  auto rate_remote = arena.subspan(bw_remote.size(), rate_slots * rate_size);
  auto lat_remote = arena.subspan(bw_remote.size() + rate_remote.size(), lat_size);
  r.expose("bench.bw", bw_remote);
  r.expose("bench.rate", rate_remote);
  r.expose("bench.lat", lat_remote);

  // The sender's staging arena, registered once, same layout.
  std::vector<std::byte> staging(arena.size());
  auto registration = t.register_memory(staging);
  const sl::local_region local = registration.region();
  auto bw_local = std::span(staging).subspan(0, bw_remote.size());
  auto rate_local = std::span(staging).subspan(bw_remote.size(), rate_remote.size());
  auto lat_local = std::span(staging).subspan(bw_remote.size() + rate_remote.size(), lat_size);

  std::error_code accept_ec, connect_ec;
  bool accepted = false, connected = false;
  std::optional<typename T::connection> connection;
  asio::co_spawn(io, accept<T>(&r, &accept_ec, &accepted), asio::detached);
  asio::co_spawn(io, connect<T>(&t, endpoint, sl::sender_identity{}, &connection, &connect_ec, &connected),
                 asio::detached);
  run_until(io, "connect", [&] { return accepted && connected; });
  if (accept_ec) throw sl::error(accept_ec, "receiver: accept failed: " + accept_ec.message());
  if (connect_ec) throw sl::error(connect_ec, "sender: connect failed: " + connect_ec.message());
  const sl::region_table& table = connection->remote_regions();
  const sl::remote_region* bw_region = table.find("bench.bw");
  const sl::remote_region* rate_region = table.find("bench.rate");
  const sl::remote_region* lat_region = table.find("bench.lat");
  if (!bw_region || !rate_region || !lat_region)
    throw std::runtime_error("the receiver's region table lacks the bench regions");
  std::printf("bench_verbs: connected over %s (%s), %s polling, %zu QPs, memory windows %s, "
              "receiver and sender in one process\n",
              o.device.c_str(), o.address.c_str(), o.poll.c_str(), t.get_options().queue_pairs,
              r.memory_windows() ? "on" : "off");

  if (o.only.empty() || o.only == "bw") {
    phase<T> p;
    p.connection = &*connection;
    for (std::size_t s = 0; s < bw_slots; ++s) {
      auto src = bw_local.subspan(s * bw_size, bw_size);
      fill(src, s, 1);
      p.requests.push_back(sl::make_write(local, src, *bw_region, s * bw_size));
    }
    p.total = o.bw_writes;
    const double s = run_phase(io, "bw_1m", p, o.bw_depth);
    const std::size_t bw_checked = std::min(o.bw_writes, bw_slots) * bw_size;
    if (!same(bw_local.first(bw_checked), bw_remote.first(bw_checked)))
      throw std::runtime_error("bw_1m: the receiver's memory differs from what was sent");
    const double mbps = double(o.bw_writes) * bw_size / mib / s;
    std::printf("bw_1m:   %zu x 1 MiB writes, %zu in flight: %.3f s, %.2f MB/s\n", o.bw_writes,
                o.bw_depth, s, mbps);
    std::printf("METRIC verbs.bw_1m %.2f MB/s\n", mbps);
    std::fflush(stdout);
  }

  if (o.only.empty() || o.only == "rate") {
    phase<T> p;
    p.connection = &*connection;
    for (std::size_t s = 0; s < rate_slots; ++s) {
      auto src = rate_local.subspan(s * rate_size, rate_size);
      fill(src, s, 2);
      p.requests.push_back(sl::make_write(local, src, *rate_region, s * rate_size));
    }
    p.batch = o.rate_batch;
    p.total = o.rate_writes;
    const double s = run_phase(io, "rate_4k", p, o.rate_depth);
    const std::size_t rate_checked = std::min(o.rate_writes, rate_slots) * rate_size;
    if (!same(rate_local.first(rate_checked), rate_remote.first(rate_checked)))
      throw std::runtime_error("rate_4k: the receiver's memory differs from what was sent");
    const double mpps = double(o.rate_writes) / s / 1e6;
    std::printf("rate_4k: %zu x 4 KiB writes, %zu per batch, %zu batches in flight: %.3f s, "
                "%.6f Mpps, %.2f MB/s\n",
                o.rate_writes, o.rate_batch, o.rate_depth, s, mpps,
                double(o.rate_writes) * rate_size / mib / s);
    std::printf("METRIC verbs.rate_4k %.6f Mpps\n", mpps);
    std::fflush(stdout);
  }

  if (o.only.empty() || o.only == "lat") {
    fill(lat_local, 0, 3);
    const sl::write_request w = sl::make_write(local, lat_local, *lat_region);
    std::vector<double> samples;
    samples.reserve(o.lat_writes);
    std::error_code ec;
    bool done = false;
    asio::co_spawn(io, latency_loop<T>(&*connection, w, o.lat_writes, &samples, &ec, &done),
                   asio::detached);
    run_until(io, "lat_8b", [&] { return done; });
    if (ec) throw sl::error(ec, "lat_8b: write failed: " + ec.message());
    if (!same(lat_local, lat_remote))
      throw std::runtime_error("lat_8b: the receiver's memory differs from what was sent");
    std::sort(samples.begin(), samples.end());
    const double median = samples[samples.size() / 2];
    std::printf("lat_8b:  %zu x one 8-byte write awaited by a coroutine: min %.2f us, median "
                "%.2f us, p99 %.2f us\n",
                samples.size(), samples.front(), median, samples[samples.size() * 99 / 100]);
    std::printf("METRIC verbs.lat_8b %.2f us\n", median);
    std::fflush(stdout);
  }

  if (o.only.empty() || o.only == "connect") {
    // The same table behind a receiver that holds no key (it warns once on stderr).
    sl::verbs::options open_options = vo;
    open_options.key.reset();
    open_options.allow_unauthenticated = true;
    T open_t(io.get_executor(), open_options);
    typename T::receiver open_r(open_t, asio::ip::tcp::endpoint(endpoint.address(), 0));
    auto open_arena = open_r.allocate(arena.size());
    open_r.expose("bench.bw", open_arena.subspan(0, bw_remote.size()));
    open_r.expose("bench.rate", open_arena.subspan(bw_remote.size(), rate_remote.size()));
    open_r.expose("bench.lat", open_arena.subspan(bw_remote.size() + rate_remote.size(), lat_size));
    std::vector<double> keyed, unauthenticated;
    for (std::size_t i = 0; i < o.connects; ++i) {  // alternating: both see the same host load
      keyed.push_back(timed_connect(io, t, r, static_cast<std::uint32_t>(i + 1)));
      unauthenticated.push_back(timed_connect(io, open_t, open_r, static_cast<std::uint32_t>(i + 1)));
    }
    const double k = median(keyed), u = median(unauthenticated);
    std::printf("connect: %zu handshakes each, alternating: with the key median %.3f ms (min %.3f), "
                "unauthenticated median %.3f ms (min %.3f): the key adds %.3f ms per connection\n",
                o.connects, k, *std::min_element(keyed.begin(), keyed.end()), u,
                *std::min_element(unauthenticated.begin(), unauthenticated.end()), k - u);
    std::printf("METRIC verbs.connect_keyed %.3f ms\n", k);
    std::printf("METRIC verbs.connect_unauthenticated %.3f ms\n", u);
    std::fflush(stdout);
    open_r.close();
  }

  connection->close();
  r.close();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const options o = parse(argc, argv);
    // The poll mode is a compile-time choice of the transport: one instantiation each.
    if (o.poll == "busy") return run<sl::verbs::poll_mode::busy>(o);
    if (o.poll == "event") return run<sl::verbs::poll_mode::event>(o);
    return run<sl::verbs::poll_mode::adaptive>(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_verbs: %s\n", e.what());
    return 1;
  }
}
