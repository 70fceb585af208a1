// The transport conformance suite (tests/support/transport_conformance.hpp) for the verbs
// transport, on the real kernel verbs stack: it runs inside the Soft-RoCE VM (tests/rxe/run),
// receiver and sender in this one process, both over rxe0.
#include "../support/transport_conformance.hpp"

#include "verbs_support.hpp"

#include <shardline/transport/verbs/transport.hpp>

namespace {

using namespace conformance;

struct verbs_fixture {
  using transport_type = sl::verbs_transport;  // the user-facing one: any_io_executor
  using connection = transport_type::connection;
  static_assert(sl::transport<transport_type>);
  // Host memory only (the GPUDirect path comes with the CUDA part): the memory-kinds case
  // expects cuda_device refused by both calls.
  static_assert(!transport_type::source_kinds.contains(sl::memory_kind::cuda_device));
  static_assert(!transport_type::destination_kinds.contains(sl::memory_kind::cuda_device));

  // A write is posted to its QPs inside async_write's initiation whenever the send queues
  // have room (always here), and posted work requests cannot be recalled: a cancelled write
  // of these sizes has landed and succeeds. Notices go over the TCP control connection and
  // never hold writes back.
  static constexpr bool cancels_queued_writes = false;

  struct endpoint {
    transport_type::receiver rx;
  };

  // Outside the VM there is no RDMA device: say so (have_device prints why) and skip.
  static bool usable() { return verbs_test::have_device(); }

  asio::io_context io;
  transport_type transport{io.get_executor(), verbs_test::keyed()};  // authenticated, as users must

  endpoint make_endpoint(std::size_t notice_depth = 64) {
    return endpoint{transport_type::receiver(transport, verbs_test::listen_endpoint(), notice_depth)};
  }

  // The receiver's async_accept and the sender's async_connect, driven together on this
  // io_context; a refusal completes both with the same code.
  connected<connection> connect(endpoint& ep, sl::sender_identity who) {
    outcome<std::error_code, std::uint32_t> accepted;
    outcome<std::error_code, connection> done;
    ep.rx.async_accept(accepted.handler());
    transport.async_connect(ep.rx.local_endpoint(), who, done.handler());
    if (!drive(io, [&] { return accepted.ready() && done.ready(); }))
      return {std::make_error_code(std::errc::timed_out), std::nullopt};
    CHECK_MESSAGE(accepted.code() == done.code(), "the receiver's accept says " << accepted.code().message()
                                                                                << ", the sender's connect "
                                                                                << done.code().message());
    CHECK(std::get<1>(accepted.get()) == who.sender);
    if (done.code()) return {done.code(), std::nullopt};
    return {{}, std::move(std::get<1>(done.get()))};
  }

  // Closing the receiver closes its control connections and destroys its QPs and memory
  // regions, as its process dying would: the sender sees the TCP end.
  void kill(endpoint& ep) { ep.rx.close(); }
};

}  // namespace

TYPE_TO_STRING_AS("verbs", verbs_fixture);

namespace conformance {

using verbs_transports = std::tuple<verbs_fixture>;

TEST_CASE_TEMPLATE_APPLY(notice_after_write, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(notice_order, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(batch_validation, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(cancelled_write, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(cancelled_notice, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(close_later, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(close_pending, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(peer_death, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(reuse_after_failure, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(expose_refusals, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(several_senders, verbs_transports);
TEST_CASE_TEMPLATE_APPLY(memory_kinds, verbs_transports);

}  // namespace conformance
