// The transport conformance suite (tests/support/transport_conformance.hpp) for the loopback
// and shm transports. The verbs transport runs the same cases inside the Soft-RoCE VM
// (tests/verbs/test_transport_conformance.cpp).
#include "../support/transport_conformance.hpp"

#include <shardline/transport/loopback.hpp>
#include <shardline/transport/shm/transport.hpp>

#include <string>
#include <unistd.h>

namespace {

using namespace conformance;

struct loopback_fixture {
  using transport_type = sl::loopback_transport;
  using connection = transport_type::connection;
  static_assert(sl::transport<transport_type>);
  // Host memory only: the memory-kinds case expects cuda_device refused by both calls.
  static_assert(!transport_type::source_kinds.contains(sl::memory_kind::cuda_device));
  static_assert(!transport_type::destination_kinds.contains(sl::memory_kind::cuda_device));

  // The copy runs inside async_write's initiation: a write is never waiting when its
  // cancellation arrives, so a cancelled write has landed and succeeds.
  static constexpr bool cancels_queued_writes = false;

  struct endpoint {
    transport_type::receiver rx;
  };

  static bool usable() { return true; }

  asio::io_context io;
  transport_type transport{io.get_executor()};

  endpoint make_endpoint(std::size_t notice_depth = 64) {
    return endpoint{transport_type::receiver(io.get_executor(), notice_depth)};
  }

  // connect() is synchronous and throws shardline::error on a refusal.
  connected<connection> connect(endpoint& ep, sl::sender_identity who) {
    try {
      return {{}, transport.connect(ep.rx, who)};
    } catch (const sl::error& e) {
      return {e.code(), std::nullopt};
    }
  }

  void kill(endpoint& ep) { ep.rx.close(); }
};

struct shm_fixture {
  using transport_type = sl::shm_transport;
  using connection = transport_type::connection;
  static_assert(sl::transport<transport_type>);
  // Host memory only: the memory-kinds case expects cuda_device refused by both calls.
  static_assert(!transport_type::source_kinds.contains(sl::memory_kind::cuda_device));
  static_assert(!transport_type::destination_kinds.contains(sl::memory_kind::cuda_device));

  // Writes and notices run one after another: a write behind an unacknowledged notice is
  // waiting, and its cancellation aborts it before any byte moves.
  static constexpr bool cancels_queued_writes = true;

  struct endpoint {
    transport_type::receiver rx;
    std::string path;
  };

  static bool usable() { return true; }

  // Small chunks: even the small writes here are split over both copy threads.
  static sl::shm_options options(std::size_t notice_depth = 64) {
    sl::shm_options o;
    o.copy_threads = 2;
    o.chunk_bytes = 1024;
    o.notice_depth = notice_depth;
    return o;
  }

  asio::io_context io;
  transport_type transport{io.get_executor(), options()};

  endpoint make_endpoint(std::size_t notice_depth = 64) {
    static int counter = 0;
    std::string path = "/tmp/shardline-conformance-" + std::to_string(::getpid()) + "-" + std::to_string(++counter) + ".sock";
    return endpoint{transport_type::receiver(io.get_executor(), path, options(notice_depth)), path};
  }

  // Both sides in this process: the receiver's async_accept and the sender's async_connect,
  // driven together. A refusal completes both with the same code.
  connected<connection> connect(endpoint& ep, sl::sender_identity who) {
    outcome<std::error_code, std::uint32_t> accepted;
    outcome<std::error_code, connection> done;
    ep.rx.async_accept(accepted.handler());
    transport.async_connect(ep.path, who, done.handler());
    if (!drive(io, [&] { return accepted.ready() && done.ready(); }))
      return {std::make_error_code(std::errc::timed_out), std::nullopt};
    CHECK_MESSAGE(accepted.code() == done.code(), "the receiver's accept says " << accepted.code().message()
                                                                                << ", the sender's connect "
                                                                                << done.code().message());
    CHECK(std::get<1>(accepted.get()) == who.sender);
    if (done.code()) return {done.code(), std::nullopt};
    return {{}, std::move(std::get<1>(done.get()))};
  }

  // In-process: closing the receiver closes every sender's socket, as its death would (the
  // shm suite kills real receiver processes with SIGKILL).
  void kill(endpoint& ep) { ep.rx.close(); }
};

}  // namespace

TYPE_TO_STRING_AS("loopback", loopback_fixture);
TYPE_TO_STRING_AS("shm", shm_fixture);

// ---- instantiation ------------------------------------------------------------------------

namespace conformance {

using conforming_transports = std::tuple<loopback_fixture, shm_fixture>;

TEST_CASE_TEMPLATE_APPLY(notice_after_write, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(notice_order, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(batch_validation, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(cancelled_write, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(cancelled_notice, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(close_later, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(close_pending, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(peer_death, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(reuse_after_failure, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(expose_refusals, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(several_senders, conforming_transports);
TEST_CASE_TEMPLATE_APPLY(memory_kinds, conforming_transports);

}  // namespace conformance
