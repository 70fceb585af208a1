// The shm sender's side of the handshake (transport/shm/transport.hpp, async_connect): what it
// makes of the arenas, descriptors and region table a receiver hands over. The parse is a
// private step of async_connect, so a fake receiver drives it: it listens on a Unix socket,
// reads the hello, admits the sender, then sends the fuzzer's header and payload with memfd
// arenas attached, and hangs up. Input:
//   byte 0: bits 0-1 arena count (0..2), bit 2 raw header (else one consistent with what is
//           sent), bit 3 arenas left unsealed;
//   then one byte per arena: its memfd is (b + 1) * 4096 bytes;
//   raw header: the next 16 bytes; then the payload (per arena u64 base and u64 length, then
//   region_table::serialize()).
// The connect must end once, never by its deadline; when it succeeds, the regions it reports
// are exactly those of the payload's table, each inside the arena its key names, the arena no
// longer than its file.
#include <shardline/transport/shm/transport.hpp>

#include "fuzz_peer.hpp"

#include <asio/local/stream_protocol.hpp>

#include <optional>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

namespace {

using namespace fuzz;
using namespace std::chrono_literals;
namespace sl = shardline;
namespace sd = shardline::detail;

const std::string& socket_path() {
  static const std::string path = "/tmp/shardline-fuzz-shm-" + std::to_string(::getpid()) + ".sock";
  return path;
}

struct fake_receiver : std::enable_shared_from_this<fake_receiver> {
  fake_receiver(asio::io_context& io, std::string h, std::string p, std::vector<sd::unique_fd> f)
      : acceptor(io, asio::local::stream_protocol::endpoint(socket_path())), socket(io), header(std::move(h)),
        payload(std::move(p)), fds(std::move(f)) {}

  asio::local::stream_protocol::acceptor acceptor;
  socket_type socket;
  std::string header, payload;
  std::vector<sd::unique_fd> fds;
  sd::hello_frame hello{};
  std::shared_ptr<scripted_peer> peer;

  void start() {
    acceptor.async_accept(socket, [self = shared_from_this()](std::error_code ec) {
      std::error_code ignored;
      self->acceptor.close(ignored);
      if (ec) return;
      asio::async_read(self->socket, asio::buffer(self->hello), [self](std::error_code ec, std::size_t) {
        if (ec) return;
        const auto verdict = sd::encode_verdict({});
        asio::write(self->socket, asio::buffer(verdict), ec);
        std::vector<int> raw;
        for (auto& f : self->fds) raw.push_back(f.get());
        if (!ec) ec = sd::send_with_fds(self->socket.native_handle(), std::as_bytes(std::span(self->header)), raw);
        self->fds.clear();
        self->peer = std::make_shared<scripted_peer>(std::move(self->socket));
        if (!ec) self->peer->send(self->payload);
        self->peer->stop_sending();
        self->peer->drain();
      });
    });
  }
};

std::optional<sd::unique_fd> make_arena(std::size_t bytes, bool seal) {
  const int fd = ::memfd_create("shardline-fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return std::nullopt;
  sd::unique_fd f(fd);
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) return std::nullopt;
  if (seal && ::fcntl(fd, F_ADD_SEALS, sd::arena_seals) != 0) return std::nullopt;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > max_socket_input) return 0;
  const std::size_t arenas = data[0] & 3;
  if (arenas > 2) return 0;
  const bool raw_header = data[0] & 4;
  const bool seal = !(data[0] & 8);
  auto in = bytes_of(data + 1, size - 1);
  if (in.size() < arenas) return 0;
  std::vector<std::size_t> file_bytes;
  std::vector<sd::unique_fd> fds;
  for (std::size_t i = 0; i < arenas; ++i) {
    file_bytes.push_back((std::size_t(static_cast<std::uint8_t>(in[i])) + 1) * 4096);
    auto f = make_arena(file_bytes.back(), seal);
    FUZZ_CHECK(f);
    fds.push_back(std::move(*f));
  }
  in.remove_prefix(arenas);
  std::string header;
  if (raw_header) {
    if (in.size() < sd::shm_header_bytes) return 0;
    header = in.substr(0, sd::shm_header_bytes);
    in.remove_prefix(sd::shm_header_bytes);
  } else {
    header = sd::shm_magic;
    sd::put_le<std::uint32_t>(header, static_cast<std::uint32_t>(arenas));
    sd::put_le<std::uint64_t>(header, in.size());
  }

  ::unlink(socket_path().c_str());
  asio::io_context io;
  auto receiver = std::make_shared<fake_receiver>(io, header, std::string(in), std::move(fds));
  receiver->start();

  sl::shm_options options;
  options.copy_threads = 1;
  options.connect_timeout = 5000ms;
  options.max_handshake_bytes = 64 * 1024;
  std::optional<sl::shm_transport> transport(std::in_place, io.get_executor(), options);
  int completions = 0;
  std::error_code result;
  std::optional<sl::region_table> regions;
  transport->async_connect(socket_path(), sl::sender_identity{1, 0},
                           [&](std::error_code ec, sl::shm_transport::connection c) {
                             ++completions;
                             result = ec;
                             if (!ec) {
                               FUZZ_CHECK(c.is_open());
                               regions = c.remote_regions();
                             }
                             c.close();  // the fake receiver's drain ends
                             std::error_code ignored;
                             receiver->acceptor.close(ignored);  // a sender that never connected
                           });
  io.run();
  ::unlink(socket_path().c_str());

  FUZZ_CHECK(completions == 1);
  FUZZ_CHECK(result != std::errc::timed_out && result != asio::error::timed_out);
  if (result) {
    FUZZ_CHECK(!transport->last_connect_failure().empty());
    return 0;
  }
  // Admitted: the header told the truth and the payload's table is what the connection holds.
  FUZZ_CHECK(header.substr(0, 4) == sd::shm_magic);
  FUZZ_CHECK(sd::get_le<std::uint32_t>(header.data() + 4) == arenas);
  const auto payload_bytes = sd::get_le<std::uint64_t>(header.data() + 8);
  FUZZ_CHECK(payload_bytes <= in.size() && payload_bytes >= 16 * arenas);
  const auto payload = in.substr(0, payload_bytes);
  std::error_code ec;
  const auto table = sl::region_table::parse(payload.substr(16 * arenas), ec);
  FUZZ_CHECK(!ec);
  FUZZ_CHECK(table.regions() == regions->regions());
  FUZZ_CHECK(seal || arenas == 0);
  for (const auto& r : table.regions()) {
    FUZZ_CHECK(r.key < arenas);
    const auto base = sd::get_le<std::uint64_t>(payload.data() + 16 * r.key);
    const auto length = sd::get_le<std::uint64_t>(payload.data() + 16 * r.key + 8);
    FUZZ_CHECK(length > 0 && length <= file_bytes[r.key]);
    FUZZ_CHECK(r.address >= base && r.address - base + r.length <= length);
  }
  return 0;
}
