#include <shardline/weights_receiver.hpp>

#include <shardline/plan/convert.hpp>
#include <shardline/transport/loopback.hpp>
#include <shardline/plan/shard_map.hpp>
#include <shardline/plan/transfer_plan.hpp>

#include <asio/bind_executor.hpp>
#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include "../support/checks.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace sl = shardline;
using namespace std::chrono_literals;

using sl::testing::check_text;
using sl::testing::check_throws;
using sl::testing::drive;
using sl::testing::settle;

namespace {

using receiver_type = sl::weights_receiver<sl::loopback_transport::receiver>;

// What async_wait_commit completed with.
struct commit_result {
  std::optional<std::error_code> ec;
  std::uint32_t version = 0;
  bool done() const { return ec.has_value(); }
};

void wait_commit(receiver_type& weights, commit_result& out) {
  weights.async_wait_commit([&out](std::error_code ec, std::uint32_t version) {
    out.ec = ec;
    out.version = version;
  });
}

void check_code(const commit_result& r, sl::errc code) {
  REQUIRE(r.done());
  CHECK(*r.ec == code);
  CHECK(r.ec->message() == sl::make_error_code(code).message());
}

// A tiny attention layer: q/k/v fuse into qkv_proj [6, 4], o_proj stays [4, 8].
const std::string q_proj = "layers.0.self_attn.q_proj.weight";
const std::string k_proj = "layers.0.self_attn.k_proj.weight";
const std::string v_proj = "layers.0.self_attn.v_proj.weight";
const std::string o_proj = "layers.0.self_attn.o_proj.weight";
const std::string qkv_proj = "layers.0.self_attn.qkv_proj.weight";

std::vector<sl::parameter_descriptor> layer() {
  return {{q_proj, sl::dtype::bf16, {2, 4}},
          {k_proj, sl::dtype::bf16, {2, 4}},
          {v_proj, sl::dtype::bf16, {2, 4}},
          {o_proj, sl::dtype::bf16, {4, 8}}};
}

// Sender 0 holds q and k, sender 1 holds v and o; with `idle`, a third sender holds nothing,
// so it is a sender of the plan but of no receiver's quorum.
sl::transfer_plan split_plan(bool idle = false) {
  sl::plan_options options;
  options.senders = idle ? 3 : 2;
  options.sender_tensors = {{q_proj, k_proj}, {v_proj, o_proj}};
  if (idle) options.sender_tensors.push_back({});
  return sl::transfer_plan::build(layer(), sl::shard_map::standard(), options);
}

// Byte i of source tensor `name` in version `version`.
std::byte pattern(std::string_view name, std::uint32_t version, std::size_t i) {
  return std::byte(static_cast<unsigned char>(std::hash<std::string_view>{}(name) + 31 * version + 7 * i));
}

// What the receiver holds of one version: q|k|v rows in qkv, o in o.
std::vector<std::byte> expected(const std::string& parameter, std::uint32_t version) {
  std::vector<std::byte> out;
  const auto add = [&](const std::string& name, std::size_t bytes) {
    for (std::size_t i = 0; i < bytes; ++i) out.push_back(pattern(name, version, i));
  };
  if (parameter == qkv_proj) {
    add(q_proj, 16);
    add(k_proj, 16);
    add(v_proj, 16);
  } else {
    add(o_proj, 64);
  }
  return out;
}

bool holds(std::span<const std::byte> bytes, const std::string& parameter, std::uint32_t version) {
  const auto want = expected(parameter, version);
  return bytes.size() == want.size() && std::equal(bytes.begin(), bytes.end(), want.begin());
}

// Everything a plan test needs: the receiver of `plan`'s receiver 0 (laid out, or adopting
// `tensors`) and the transport its senders connect through.
struct plan_fixture {
  asio::io_context io;
  sl::transfer_plan plan;
  sl::loopback_transport transport{io.get_executor()};
  sl::loopback_transport::receiver endpoint{io.get_executor()};
  receiver_type weights;

  explicit plan_fixture(sl::transfer_plan p) : plan(std::move(p)), weights(endpoint, plan, 0) {}
  plan_fixture(sl::transfer_plan p, std::vector<sl::engine_tensor> tensors)
      : plan(std::move(p)), weights(endpoint, plan, 0, std::move(tensors)) {}

  sl::loopback_transport::connection connect(std::uint32_t sender) {
    return transport.connect(endpoint, {sender, plan.fingerprint()});
  }

  // Sends a notice and waits for its acknowledgement.
  void notify(sl::loopback_transport::connection& c, sl::notice_kind kind, std::uint32_t version) {
    std::optional<std::error_code> ack;
    c.async_notify(kind, version, [&ack](std::error_code ec) { ack = ec; });
    REQUIRE(drive(io, [&] { return ack.has_value(); }));
    CHECK_MESSAGE(!*ack, "notice " << sl::to_string(kind) << " " << version << ": " << ack->message());
  }

  // Sender `sender`'s part of `version`, as its sender plan lays it out: each of its shards
  // loaded into a staging image, then the plan's writes to receiver 0.
  void write(sl::loopback_transport::connection& c, std::uint32_t sender, std::uint32_t version) {
    const sl::transfer_plan mine = plan.for_sender(sender);
    std::vector<std::vector<std::byte>> images;
    images.reserve(mine.parameter_count());
    std::vector<sl::write_request> requests;
    for (std::size_t i = 0; i < mine.parameter_count(); ++i) {
      const sl::planned_parameter& p = mine.parameter(i);
      auto& image = images.emplace_back(p.staging_bytes);
      for (const auto& s : p.parameter.shards)
        for (std::size_t b = 0; b < s.tensor.bytes(); ++b) image[s.offset + b] = pattern(s.tensor.name, version, b);
      const auto local = transport.register_memory(image).region();
      const sl::remote_region* region = c.remote_regions().find(p.slice.name);
      REQUIRE(region != nullptr);
      for (const auto& w : p.writes)
        if (w.receiver == 0)
          requests.push_back(sl::make_write(local, std::span(image).subspan(w.staging_offset, w.bytes), *region,
                                            w.destination_offset));
    }
    std::optional<std::error_code> done;
    c.async_write(requests, [&done](std::error_code ec) { done = ec; });
    REQUIRE(drive(io, [&] { return done.has_value(); }));
    CHECK_MESSAGE(!*done, "write of sender " << sender << ": " << done->message());
  }

  // begin, write, commit of one sender.
  void send_version(sl::loopback_transport::connection& c, std::uint32_t sender, std::uint32_t version) {
    notify(c, sl::notice_kind::begin, version);
    write(c, sender, version);
    notify(c, sl::notice_kind::commit, version);
  }
};

// The engine's own tensors for receiver 0 of split_plan(), in buffers the test owns.
struct engine_memory {
  std::vector<std::byte> qkv_bytes = std::vector<std::byte>(48);
  std::vector<std::byte> o_bytes = std::vector<std::byte>(64);
  std::vector<std::byte> extra_bytes = std::vector<std::byte>(8);

  std::vector<sl::engine_tensor> tensors() {
    return {{qkv_proj, sl::dtype::bf16, {6, 4}, qkv_bytes},
            {o_proj, sl::dtype::bf16, {4, 8}, o_bytes},
            {"lm_head.weight", sl::dtype::f32, {2}, extra_bytes}};  // not planned: ignored
  }
};

// Adopting `tensors` for receiver 0 of split_plan() fails with `code`, names `names`, and
// leaves nothing exposed.
void check_adopt_error(std::vector<sl::engine_tensor> tensors, sl::errc code,
                       std::initializer_list<std::string_view> names) {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  const auto plan = split_plan();
  check_throws([&] { receiver_type weights(endpoint, plan, 0, tensors); }, code, names);
  CHECK_MESSAGE(endpoint.regions().empty(), "a refused adoption left " << endpoint.regions().size() << " region(s) exposed");
}

}  // namespace

// Layout mode ---------------------------------------------------------------------------------

TEST_CASE("weights_receiver: lays parameters out aligned in one arena and exposes each") {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  sl::weights_receiver weights(endpoint, {{"a", sl::dtype::bf16, {3}}, {"b", sl::dtype::f32, {4}}}, 256);
  CHECK(weights.parameter("a").size() == 6);
  CHECK(weights.parameter("b").size() == 16);
  CHECK(weights.parameter("b").data() - weights.parameter("a").data() == 256);
  REQUIRE(endpoint.regions().size() == 2);
  CHECK(endpoint.regions().find("b")->length == 16);
  CHECK(endpoint.regions().find("b")->layout == sl::tensor_layout{sl::dtype::f32, {4}});
  CHECK(endpoint.regions().find("a")->location == sl::memory_location::host());
  CHECK(weights.quorum() == std::vector<std::uint32_t>{0});
  CHECK(!weights.committed_version().has_value());
  CHECK(!weights.state().dirty);
}

TEST_CASE("weights_receiver: a parameter given twice or an unknown name is an error naming it") {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  check_throws([&] {
    sl::weights_receiver twice(endpoint, {{"w", sl::dtype::bf16, {2}}, {"w", sl::dtype::bf16, {2}}});
  }, sl::errc::invalid_argument, {"'w'", "given twice"});
  sl::loopback_transport::receiver other(io.get_executor());
  sl::weights_receiver weights(other, {{"w", sl::dtype::bf16, {2}}});
  check_throws([&] { weights.parameter("nope"); }, sl::errc::unknown_parameter, {"'nope'"});
}

TEST_CASE("weights_receiver: layout mode announces a version once sender 0 began, wrote and committed it") {
  asio::io_context io;
  sl::loopback_transport transport(io.get_executor());
  sl::loopback_transport::receiver endpoint(io.get_executor());
  sl::weights_receiver weights(endpoint, {{"w", sl::dtype::bf16, {4}}});
  auto conn = transport.connect(endpoint);
  commit_result r;
  wait_commit(weights, r);
  std::vector<std::byte> source(8, std::byte{0x5a});
  const auto local = transport.register_memory(source).region();
  const sl::write_request w[] = {sl::make_write(local, source, *conn.remote_regions().find("w"))};
  std::optional<std::error_code> begun, written, acked;
  conn.async_notify(sl::notice_kind::begin, 41, [&](std::error_code ec) { begun = ec; });
  conn.async_write(w, [&](std::error_code ec) { written = ec; });
  REQUIRE(drive(io, [&] { return begun && written; }));
  settle(io);
  CHECK(!r.done());
  CHECK(weights.state().dirty);
  CHECK(weights.state().target == 41);
  conn.async_notify(sl::notice_kind::commit, 41, [&](std::error_code ec) { acked = ec; });
  REQUIRE(drive(io, [&] { return r.done(); }));
  CHECK(!*r.ec);
  CHECK(r.version == 41);
  CHECK(weights.committed_version() == 41u);
  CHECK(!weights.state().dirty);
  CHECK(weights.state().reason.empty());
  const auto bytes = weights.parameter("w");
  CHECK(std::vector<std::byte>(bytes.begin(), bytes.end()) == source);
}

TEST_CASE("weights_receiver: layout mode admits sender 0 only; another id is refused at connect") {
  asio::io_context io;
  sl::loopback_transport transport(io.get_executor());
  sl::loopback_transport::receiver endpoint(io.get_executor());
  sl::weights_receiver weights(endpoint, {{"w", sl::dtype::bf16, {4}}});
  try {
    auto stranger = transport.connect(endpoint, {1, 0});
    FAIL("sender 1 was admitted by a single-sender receiver");
  } catch (const sl::error& e) {
    CHECK(e.code() == sl::errc::unknown_sender);
    check_text(e.what(), "unknown sender", {"sender 1"});
  }
  CHECK_NOTHROW(transport.connect(endpoint, {0, 0}));
  CHECK(!weights.state().dirty);
}

TEST_CASE("weights_receiver: closing the endpoint ends async_wait_commit with an error") {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  sl::weights_receiver weights(endpoint, {{"w", sl::dtype::bf16, {4}}});
  commit_result r;
  wait_commit(weights, r);
  settle(io);
  CHECK(!r.done());
  endpoint.close();
  REQUIRE(drive(io, [&] { return r.done(); }));
  CHECK(*r.ec);
  CHECK(*r.ec != sl::errc::version_abandoned);
}

namespace {
// A loopback receiver that records, for each async_wait_notification, whether it was started
// from inside its own executor.
struct recording_receiver {
  asio::io_context& io;
  sl::loopback_transport::receiver inner{io.get_executor()};
  std::vector<bool> on_own_executor;

  explicit recording_receiver(asio::io_context& context) : io(context) {}
  auto get_executor() const { return inner.get_executor(); }
  std::span<std::byte> allocate(std::size_t n) { return inner.allocate(n); }
  void expose(sl::exposure e) { inner.expose(std::move(e)); }
  void expose(std::string name, std::span<std::byte> bytes) { inner.expose(std::move(name), bytes); }
  void admit(sl::admission a) { inner.admit(a); }
  const sl::region_table& regions() const { return inner.regions(); }
  template <class Token>
  auto async_wait_notification(Token&& token) {
    on_own_executor.push_back(io.get_executor().running_in_this_thread());
    return inner.async_wait_notification(std::forward<Token>(token));
  }
  void close() { inner.close(); }
};
}  // namespace

// A handler bound to another executor (another io_context here; use_future's is a thread
// pool) must not move the receiver's work there: its state and the endpoint are not
// thread-safe, and are used from the endpoint's executor.
TEST_CASE("weights_receiver: notices are taken on the endpoint's executor, whatever the handler's executor") {
  asio::io_context io, elsewhere;
  sl::loopback_transport transport(io.get_executor());
  recording_receiver endpoint(io);
  sl::weights_receiver weights(endpoint, {{"w", sl::dtype::bf16, {4}}});
  auto conn = transport.connect(endpoint.inner);
  commit_result r;
  weights.async_wait_commit(asio::bind_executor(elsewhere.get_executor(), [&r](std::error_code ec, std::uint32_t version) {
    r.ec = ec;
    r.version = version;
  }));
  std::optional<std::error_code> begun, acked;
  conn.async_notify(sl::notice_kind::begin, 5, [&](std::error_code ec) { begun = ec; });
  REQUIRE(drive(io, [&] { return begun.has_value(); }));
  settle(io);
  CHECK(weights.state().dirty);  // the begin was taken on io
  CHECK(weights.state().target == 5);
  settle(elsewhere);
  settle(io);
  conn.async_notify(sl::notice_kind::commit, 5, [&](std::error_code ec) { acked = ec; });
  REQUIRE(drive(io, [&] { return acked.has_value(); }));
  for (int round = 0; round < 8 && !r.done(); ++round) {
    settle(io);
    settle(elsewhere);
  }
  REQUIRE(r.done());
  CHECK(!*r.ec);
  CHECK(r.version == 5);
  REQUIRE(endpoint.on_own_executor.size() >= 2);
  // The first wait starts in async_wait_commit; every later one from the endpoint's executor.
  for (std::size_t i = 1; i < endpoint.on_own_executor.size(); ++i) {
    CAPTURE(i);
    CHECK(endpoint.on_own_executor[i]);
  }
}

// Plan mode -----------------------------------------------------------------------------------

TEST_CASE("weights_receiver: plan mode admits only the plan's senders, built from the same plan") {
  plan_fixture f(split_plan());
  CHECK(f.weights.quorum() == std::vector<std::uint32_t>{0, 1});
  CHECK(f.weights.parameter(qkv_proj).size() == 48);
  CHECK(f.weights.parameter(o_proj).size() == 64);
  CHECK(f.endpoint.regions().find(qkv_proj)->layout == sl::tensor_layout{sl::dtype::bf16, {6, 4}});
  check_throws([&] { f.transport.connect(f.endpoint, {0, f.plan.fingerprint() ^ 1}); }, sl::errc::plan_mismatch,
               {"sender 0"});
  check_throws([&] { f.transport.connect(f.endpoint, {2, f.plan.fingerprint()}); }, sl::errc::unknown_sender,
               {"sender 2"});
  // Another split of the same tensors is another plan.
  sl::plan_options other;
  other.senders = 2;
  other.sender_tensors = {{q_proj}, {k_proj, v_proj, o_proj}};
  const auto moved = sl::transfer_plan::build(layer(), sl::shard_map::standard(), other);
  REQUIRE(moved.fingerprint() != f.plan.fingerprint());
  check_throws([&] { f.transport.connect(f.endpoint, {1, moved.fingerprint()}); }, sl::errc::plan_mismatch,
               {"sender 1"});
  CHECK(f.connect(0).is_open());
  CHECK(f.connect(1).is_open());
}

TEST_CASE("weights_receiver: a version commits only once every sender of the quorum committed it") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result committed;
  wait_commit(f.weights, committed);
  f.notify(c0, sl::notice_kind::begin, 1);
  f.notify(c1, sl::notice_kind::begin, 1);
  f.write(c0, 0, 1);
  f.write(c1, 1, 1);
  f.notify(c0, sl::notice_kind::commit, 1);
  settle(f.io);
  CHECK(!committed.done());  // sender 1 has not committed
  CHECK(f.weights.state().dirty);
  CHECK(f.weights.state().target == 1);
  CHECK(!f.weights.committed_version().has_value());
  f.notify(c1, sl::notice_kind::commit, 1);
  REQUIRE(drive(f.io, [&] { return committed.done(); }));
  CHECK(!*committed.ec);
  CHECK(committed.version == 1);
  CHECK(f.weights.committed_version() == 1u);
  CHECK(!f.weights.state().dirty);
  CHECK(holds(f.weights.parameter(qkv_proj), qkv_proj, 1));
  CHECK(holds(f.weights.parameter(o_proj), o_proj, 1));

  // The other order, for the next version: sender 1 first, then sender 0.
  commit_result second;
  wait_commit(f.weights, second);
  f.send_version(c1, 1, 2);
  settle(f.io);
  CHECK(!second.done());
  f.send_version(c0, 0, 2);
  REQUIRE(drive(f.io, [&] { return second.done(); }));
  CHECK(!*second.ec);
  CHECK(second.version == 2);
  CHECK(holds(f.weights.parameter(qkv_proj), qkv_proj, 2));
}

TEST_CASE("weights_receiver: a sender disconnecting mid-version abandons it, naming the sender") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result r;
  wait_commit(f.weights, r);
  const auto before = sl::memory_state::clock::now();
  f.send_version(c0, 0, 7);
  f.notify(c1, sl::notice_kind::begin, 7);
  f.write(c1, 1, 7);
  settle(f.io);
  CHECK(!r.done());
  c1.close();  // after begin, before commit
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  check_code(r, sl::errc::version_abandoned);
  CHECK(r.version == 7);
  const auto& state = f.weights.state();
  CHECK(state.dirty);
  CHECK(state.target == 7);
  CHECK(state.since != sl::memory_state::clock::time_point{});
  CHECK(state.since >= before);
  CHECK(!state.committed.has_value());
  check_text(state.reason, "disconnected", {"sender 1", "version 7"});
}

TEST_CASE("weights_receiver: a sender disconnecting between versions is no error; the waiter goes on") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result first;
  wait_commit(f.weights, first);
  f.send_version(c0, 0, 1);
  f.send_version(c1, 1, 1);
  REQUIRE(drive(f.io, [&] { return first.done(); }));
  CHECK(!*first.ec);
  CHECK(first.version == 1);
  commit_result r;
  wait_commit(f.weights, r);
  c1.close();
  settle(f.io);
  CHECK(!r.done());
  CHECK(!f.weights.state().dirty);
  CHECK(f.weights.committed_version() == 1u);
  // The restarted trainer rank reconnects and the next version commits.
  auto again = f.connect(1);
  f.send_version(c0, 0, 2);
  f.send_version(again, 1, 2);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  CHECK(!*r.ec);
  CHECK(r.version == 2);
  CHECK(holds(f.weights.parameter(o_proj), o_proj, 2));
}

TEST_CASE("weights_receiver: a sender that leaves after committing its part does not abandon the version") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result r;
  wait_commit(f.weights, r);
  f.notify(c1, sl::notice_kind::begin, 3);
  f.send_version(c0, 0, 3);
  c0.close();
  settle(f.io);
  CHECK(!r.done());
  f.write(c1, 1, 3);
  f.notify(c1, sl::notice_kind::commit, 3);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  CHECK(!*r.ec);
  CHECK(r.version == 3);
  CHECK(holds(f.weights.parameter(qkv_proj), qkv_proj, 3));
}

TEST_CASE("weights_receiver: an abort abandons the version; the next version commits normally") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result r;
  wait_commit(f.weights, r);
  f.notify(c0, sl::notice_kind::begin, 3);
  f.notify(c1, sl::notice_kind::begin, 3);
  f.write(c0, 0, 3);
  f.notify(c0, sl::notice_kind::abort, 3);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  check_code(r, sl::errc::version_abandoned);
  CHECK(r.version == 3);
  CHECK(f.weights.state().dirty);
  CHECK(f.weights.state().target == 3);
  check_text(f.weights.state().reason, "aborted", {"sender 0", "version 3"});

  // Sender 1's commit of the abandoned version announces nothing.
  commit_result next;
  wait_commit(f.weights, next);
  f.write(c1, 1, 3);
  f.notify(c1, sl::notice_kind::commit, 3);
  settle(f.io);
  CHECK(!next.done());
  CHECK(f.weights.state().dirty);

  f.send_version(c0, 0, 4);
  f.send_version(c1, 1, 4);
  REQUIRE(drive(f.io, [&] { return next.done(); }));
  CHECK(!*next.ec);
  CHECK(next.version == 4);
  CHECK(!f.weights.state().dirty);
  CHECK(f.weights.committed_version() == 4u);
  CHECK(holds(f.weights.parameter(qkv_proj), qkv_proj, 4));
  CHECK(holds(f.weights.parameter(o_proj), o_proj, 4));
}

TEST_CASE("weights_receiver: after a disconnect mid-version, the next version commits normally") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0);
  std::optional<sl::loopback_transport::connection> c1 = f.connect(1);
  commit_result r;
  wait_commit(f.weights, r);
  f.notify(*c1, sl::notice_kind::begin, 5);
  f.write(*c1, 1, 5);
  c1->close();
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  check_code(r, sl::errc::version_abandoned);
  CHECK(r.version == 5);
  c1 = f.connect(1);
  commit_result next;
  wait_commit(f.weights, next);
  f.send_version(c0, 0, 6);
  f.send_version(*c1, 1, 6);
  REQUIRE(drive(f.io, [&] { return next.done(); }));
  CHECK(!*next.ec);
  CHECK(next.version == 6);
  CHECK(!f.weights.state().dirty);
  CHECK(holds(f.weights.parameter(o_proj), o_proj, 6));
}

TEST_CASE("weights_receiver: a withdraw from every sender that began leaves memory clean; the waiter gets version_abandoned") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result first;
  wait_commit(f.weights, first);
  f.send_version(c0, 0, 1);
  f.send_version(c1, 1, 1);
  REQUIRE(drive(f.io, [&] { return first.done(); }));
  CHECK(!*first.ec);
  CHECK(first.version == 1);

  commit_result r;
  wait_commit(f.weights, r);
  f.notify(c0, sl::notice_kind::begin, 2);
  f.notify(c1, sl::notice_kind::begin, 2);
  settle(f.io);
  CHECK(f.weights.state().dirty);
  f.notify(c0, sl::notice_kind::withdraw, 2);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  check_code(r, sl::errc::version_abandoned);
  CHECK(r.version == 2);
  check_text(f.weights.state().reason, "withdrew", {"sender 0", "version 2"});
  CHECK(f.weights.state().dirty);  // sender 1 began and may have written

  commit_result next;
  wait_commit(f.weights, next);
  f.notify(c1, sl::notice_kind::withdraw, 2);
  settle(f.io);
  CHECK(!next.done());  // one waiter learns of the abandonment, once
  CHECK(!f.weights.state().dirty);  // nobody wrote a byte of version 2
  CHECK(f.weights.committed_version() == 1u);
  CHECK(holds(f.weights.parameter(qkv_proj), qkv_proj, 1));

  f.send_version(c0, 0, 3);
  f.send_version(c1, 1, 3);
  REQUIRE(drive(f.io, [&] { return next.done(); }));
  CHECK(!*next.ec);
  CHECK(next.version == 3);
}

TEST_CASE("weights_receiver: a withdraw by the only sender that began leaves memory clean at once") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0);
  commit_result r;
  wait_commit(f.weights, r);
  f.notify(c0, sl::notice_kind::begin, 1);
  f.notify(c0, sl::notice_kind::withdraw, 1);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  check_code(r, sl::errc::version_abandoned);
  CHECK(r.version == 1);
  CHECK(!f.weights.state().dirty);
  CHECK(!f.weights.committed_version().has_value());
}

TEST_CASE("weights_receiver: a notice from a sender of the plan outside the quorum is unknown_sender") {
  plan_fixture f(split_plan(true));
  REQUIRE(f.plan.senders() == 3);
  REQUIRE(f.plan.receiver_senders(0) == std::vector<std::uint32_t>{0, 1});
  CHECK(f.weights.quorum() == std::vector<std::uint32_t>{0, 1});
  auto idle = f.connect(2);  // admitted: an id of the plan, built from it
  commit_result r;
  wait_commit(f.weights, r);
  f.notify(idle, sl::notice_kind::begin, 1);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  check_code(r, sl::errc::unknown_sender);
  CHECK(r.version == 1);
  check_text(f.weights.last_refusal(), "not a sender of this receiver", {"sender 2", "begin"});
  CHECK(!f.weights.state().dirty);
  // The quorum's senders still commit.
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result next;
  wait_commit(f.weights, next);
  f.send_version(c0, 0, 1);
  f.send_version(c1, 1, 1);
  REQUIRE(drive(f.io, [&] { return next.done(); }));
  CHECK(!*next.ec);
  CHECK(next.version == 1);
}

TEST_CASE("weights_receiver: a commit or abort of a version its sender did not begin is refused naming the sender, "
          "never counted; the senders then update") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result refused;
  wait_commit(f.weights, refused);
  // Sender 0 does its whole part of version 1; sender 1's notice alone would complete the quorum.
  f.send_version(c0, 0, 1);
  std::string says;
  SUBCASE("a commit never begun") {
    f.notify(c1, sl::notice_kind::commit, 1);
    says = "sender 1 committed version 1 without beginning it";
  }
  SUBCASE("a commit of another version than the one begun") {
    f.notify(c1, sl::notice_kind::begin, 1);
    f.notify(c1, sl::notice_kind::commit, 2);
    says = "sender 1 committed version 2 while in version 1";
  }
  SUBCASE("an abort never begun") {
    f.notify(c1, sl::notice_kind::abort, 1);
    says = "sender 1 aborted version 1 without beginning it";
  }
  REQUIRE(drive(f.io, [&] { return refused.done(); }));
  check_code(refused, sl::errc::protocol_error);
  check_text(f.weights.last_refusal(), says, {});
  // Never announced, nothing abandoned: the memory is still on its way to version 1.
  CHECK(!f.weights.committed_version().has_value());
  CHECK(f.weights.state().dirty);
  CHECK(f.weights.state().target == 1);
  CHECK(f.weights.state().reason == "receiving version 1");

  // Sender 1 now does its part in sequence: version 1 commits, every byte of it here.
  commit_result r;
  wait_commit(f.weights, r);
  f.send_version(c1, 1, 1);
  REQUIRE(drive(f.io, [&] { return r.done(); }));
  CHECK(!*r.ec);
  CHECK(r.version == 1);
  CHECK(!f.weights.state().dirty);
  CHECK(holds(f.weights.parameter(qkv_proj), qkv_proj, 1));
  CHECK(holds(f.weights.parameter(o_proj), o_proj, 1));
}

TEST_CASE("weights_receiver: a commit after a refused stale begin is a stale notice, not a violation") {
  plan_fixture f(split_plan());
  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result first;
  wait_commit(f.weights, first);
  f.send_version(c0, 0, 4);
  f.send_version(c1, 1, 4);
  REQUIRE(drive(f.io, [&] { return first.done(); }));
  REQUIRE(!*first.ec);
  commit_result stale;
  wait_commit(f.weights, stale);
  f.notify(c1, sl::notice_kind::begin, 3);
  REQUIRE(drive(f.io, [&] { return stale.done(); }));
  check_code(stale, sl::errc::stale_version);
  commit_result next;
  wait_commit(f.weights, next);
  f.notify(c1, sl::notice_kind::commit, 3);  // follows its own begin: announces nothing, refuses nothing
  settle(f.io);
  CHECK(!next.done());
  f.send_version(c0, 0, 5);
  f.send_version(c1, 1, 5);
  REQUIRE(drive(f.io, [&] { return next.done(); }));
  CHECK(!*next.ec);
  CHECK(next.version == 5);
  CHECK(holds(f.weights.parameter(qkv_proj), qkv_proj, 5));
  CHECK(holds(f.weights.parameter(o_proj), o_proj, 5));
}

// Adopt mode ----------------------------------------------------------------------------------

TEST_CASE("weights_receiver: adopts the engine's tensors, and the senders write into them") {
  engine_memory engine;
  plan_fixture f(split_plan(), engine.tensors());
  CHECK(f.weights.parameter(qkv_proj).data() == engine.qkv_bytes.data());
  CHECK(f.weights.parameter(o_proj).data() == engine.o_bytes.data());
  CHECK(f.weights.quorum() == std::vector<std::uint32_t>{0, 1});
  REQUIRE(f.endpoint.regions().size() == 2);  // the unplanned tensor is not exposed
  CHECK(f.endpoint.regions().find("lm_head.weight") == nullptr);
  const auto* region = f.endpoint.regions().find(qkv_proj);
  REQUIRE(region != nullptr);
  CHECK(region->address == reinterpret_cast<std::uintptr_t>(engine.qkv_bytes.data()));
  CHECK(region->length == 48);
  CHECK(region->layout == sl::tensor_layout{sl::dtype::bf16, {6, 4}});
  check_throws([&] { f.transport.connect(f.endpoint, {0, 1}); }, sl::errc::plan_mismatch, {"sender 0"});

  auto c0 = f.connect(0), c1 = f.connect(1);
  commit_result committed;
  wait_commit(f.weights, committed);
  f.send_version(c0, 0, 9);
  f.send_version(c1, 1, 9);
  REQUIRE(drive(f.io, [&] { return committed.done(); }));
  CHECK(!*committed.ec);
  CHECK(committed.version == 9);
  CHECK(holds(engine.qkv_bytes, qkv_proj, 9));
  CHECK(holds(engine.o_bytes, o_proj, 9));
  CHECK(std::all_of(engine.extra_bytes.begin(), engine.extra_bytes.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE("weights_receiver: adopt refuses a tensor given twice, a wrong span size and an unaligned tensor") {
  engine_memory engine;
  auto twice = engine.tensors();
  twice.push_back(twice[1]);
  check_adopt_error(twice, sl::errc::invalid_argument, {"'" + o_proj + "'", "given twice"});

  auto short_span = engine.tensors();
  short_span[1].bytes = std::span(engine.o_bytes).first(62);
  check_adopt_error(short_span, sl::errc::invalid_argument, {"'" + o_proj + "'", "bf16 [4, 8]", "needs 64 bytes", "has 62"});

  std::vector<std::byte> odd(49);
  auto unaligned = engine.tensors();
  const bool even_start = reinterpret_cast<std::uintptr_t>(odd.data()) % 2 == 0;
  unaligned[0].bytes = std::span(odd).subspan(even_start ? 1 : 0, 48);  // bf16 at an odd address
  check_adopt_error(unaligned, sl::errc::invalid_argument, {"'" + qkv_proj + "'", "not aligned", "2-byte"});
}

TEST_CASE("weights_receiver: adopt refuses two overlapping tensors, naming both") {
  std::vector<std::byte> shared(128);
  const auto tensors = [&](std::size_t o_at) {
    return std::vector<sl::engine_tensor>{{qkv_proj, sl::dtype::bf16, {6, 4}, std::span(shared).subspan(0, 48)},
                                          {o_proj, sl::dtype::bf16, {4, 8}, std::span(shared).subspan(o_at, 64)}};
  };
  {
    INFO("o_proj starts inside qkv_proj");
    check_adopt_error(tensors(32), sl::errc::invalid_argument, {"'" + qkv_proj + "'", "'" + o_proj + "'", "overlap"});
  }
  // Touching is fine.
  {
    asio::io_context io;
    sl::loopback_transport::receiver endpoint(io.get_executor());
    const auto plan = split_plan();
    receiver_type weights(endpoint, plan, 0, tensors(48));
    CHECK(endpoint.regions().size() == 2);
  }
  {
    INFO("both start at one address");
    check_adopt_error(tensors(0), sl::errc::invalid_argument, {"'" + qkv_proj + "'", "'" + o_proj + "'", "overlap"});
  }
  {
    INFO("an unplanned tensor overlapping a planned one");
    auto with_extra = tensors(48);
    with_extra.push_back({"lm_head.weight", sl::dtype::bf16, {8}, std::span(shared).subspan(100, 16)});
    check_adopt_error(with_extra, sl::errc::invalid_argument, {"'" + o_proj + "'", "'lm_head.weight'", "overlap"});
  }
}

TEST_CASE("weights_receiver: adopt refuses a missing planned parameter as unknown_parameter") {
  engine_memory engine;
  auto missing = engine.tensors();
  missing.erase(missing.begin() + 1);
  check_adopt_error(missing, sl::errc::unknown_parameter, {"'" + o_proj + "'", "bf16 [4, 8]"});
}

TEST_CASE("weights_receiver: adopt refuses the same byte count in another dtype or shape, naming both layouts") {
  engine_memory engine;
  auto f16 = engine.tensors();
  f16[1].type = sl::dtype::f16;
  check_adopt_error(f16, sl::errc::layout_mismatch, {"'" + o_proj + "'", "f16 [4, 8]", "bf16 [4, 8]"});
  auto transposed = engine.tensors();
  transposed[1].shape = {8, 4};
  check_adopt_error(transposed, sl::errc::layout_mismatch, {"'" + o_proj + "'", "bf16 [8, 4]", "bf16 [4, 8]"});
  auto flat = engine.tensors();
  flat[0].shape = {24};
  check_adopt_error(flat, sl::errc::layout_mismatch, {"'" + qkv_proj + "'", "bf16 [24]", "bf16 [6, 4]"});
}

TEST_CASE("weights_receiver: adopt refuses engine tensors in memory the transport cannot write") {
  engine_memory engine;
  auto on_gpu = engine.tensors();
  on_gpu[0].location = sl::memory_location::cuda(0);
  check_adopt_error(on_gpu, sl::errc::unsupported_memory, {"'" + qkv_proj + "'", "cuda_device:0", "{host, host_pinned}"});
}

TEST_CASE("weights_receiver: a refused adoption leaves the endpoint as it was, so a corrected retry succeeds") {
  asio::io_context io;
  sl::loopback_transport::receiver endpoint(io.get_executor());
  const auto plan = split_plan();
  engine_memory engine;
  auto on_gpu = engine.tensors();
  on_gpu[1].location = sl::memory_location::cuda(0);  // o_proj, exposed after qkv_proj
  check_throws([&] { receiver_type weights(endpoint, plan, 0, on_gpu); }, sl::errc::unsupported_memory,
               {"'" + o_proj + "'", "cuda_device:0"});
  CHECK(endpoint.regions().empty());
  try {
    receiver_type weights(endpoint, plan, 0, engine.tensors());
    CHECK(endpoint.regions().size() == 2);
  } catch (const std::exception& e) {
    FAIL_CHECK("the corrected retry failed: " << std::string(e.what()));
  }
}

// convert -------------------------------------------------------------------------------------

TEST_CASE("convert: f32 -> bf16 rounds to nearest even and checks sizes") {
  CHECK(sl::to_bf16(1.0f) == 0x3f80);
  CHECK(sl::from_bf16(sl::to_bf16(-2.5f)) == -2.5f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
  CHECK(sl::to_bf16(1.0f + 1.0f / 256) == 0x3f80);
  CHECK(sl::to_bf16(1.0f + 3.0f / 256) == 0x3f82);
  const std::vector<float> source{1.0f, 2.0f};
  std::vector<std::byte> out(4);
  sl::convert_f32_to_bf16(source, out);
  std::uint16_t second = 0;
  std::memcpy(&second, out.data() + 2, 2);
  CHECK(second == 0x4000);
  std::vector<std::byte> small(3);
  check_throws([&] { sl::convert_f32_to_bf16(source, small); }, sl::errc::size_mismatch,
               {"2 elements need 4 bytes, the destination has 3"});
}
