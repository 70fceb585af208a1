// Uses the installed core the way a user would: the umbrella header, an io_context, one
// write and an acknowledged commit notice over the loopback transport, checked byte for byte.
#include <shardline/shardline.hpp>

#include <asio/io_context.hpp>

#include <cstdio>
#include <cstring>
#include <system_error>

int main() {
  asio::io_context io;
  shardline::loopback_transport transport(io.get_executor());
  shardline::loopback_transport::receiver receiver(io.get_executor());
  auto param = receiver.allocate(64);
  receiver.expose("model.embed_tokens.weight", param);

  std::byte staging[64];
  for (std::size_t i = 0; i < sizeof staging; ++i) staging[i] = std::byte(i * 7);
  auto local = transport.register_memory(staging).region();
  auto conn = transport.connect(receiver);
  const auto* region = conn.remote_regions().find("model.embed_tokens.weight");
  if (!region) {
    std::fprintf(stderr, "consumer: exposed region missing\n");
    return 1;
  }
  const shardline::write_request batch[] = {shardline::make_write(local, staging, *region)};

  std::error_code write_ec = make_error_code(std::errc::operation_in_progress);
  std::error_code notify_ec = write_ec;
  std::error_code ack_ec = write_ec;
  shardline::notice seen{};
  receiver.async_wait_notification([&](std::error_code ec, shardline::notice n) {
    notify_ec = ec;
    seen = n;
  });
  conn.async_write(batch, [&](std::error_code ec) {
    write_ec = ec;
    conn.async_notify(shardline::notice_kind::commit, 1, [&](std::error_code e) { ack_ec = e; });
  });
  io.run();

  const std::uint32_t version = seen.version;
  if (write_ec || notify_ec || ack_ec || seen.kind != shardline::notice_kind::commit || version != 1 ||
      std::memcmp(param.data(), staging, 64) != 0) {
    std::fprintf(stderr, "consumer: write=%s notify=%s ack=%s version=%u\n", write_ec.message().c_str(),
                 notify_ec.message().c_str(), ack_ec.message().c_str(), version);
    return 1;
  }
  std::puts("consumer: installed shardline works (64 bytes written, version 1 committed and acknowledged)");
  return 0;
}
