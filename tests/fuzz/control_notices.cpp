// Both ends of the control link after the handshake (transport/detail/control_link.hpp), over
// a connected pair of Unix sockets in one io_context, against a peer whose bytes the fuzzer
// chose. Input: byte 0 configures; the rest is what the peer sends before it hangs up.
//   receiver (serve_notices): the peer's bytes are notice frames. Every valid frame before the
//     first invalid one must arrive, in order, and be echoed (byte 0 bit 0: acknowledged later
//     through acknowledge_notice, as a full queue does); the sender then leaves once, with
//     protocol_error at an invalid frame, peer_disconnected at the end of the bytes.
//   sender (notice_link): 1 to 4 notices (byte 0 bits 1-2) go out; the peer's bytes are their
//     acks. Each ack that echoes the oldest unacknowledged frame reports its tag, in order;
//     anything else ends the link once with protocol_error, the end of the bytes with
//     peer_disconnected.
#include <shardline/transport/detail/control_link.hpp>

#include "fuzz_peer.hpp"

#include <asio/post.hpp>

#include <vector>

namespace {

using namespace fuzz;
namespace sl = shardline;
namespace sd = shardline::detail;

struct peer_type : sd::notice_source<socket_type> {
  using sd::notice_source<socket_type>::notice_source;
};

struct receiving : std::enable_shared_from_this<receiving> {
  asio::io_context& io;
  bool defer = false;
  bool closed = false;
  std::vector<sl::notice> got;
  int left = 0;
  std::error_code why;

  receiving(asio::io_context& i, bool d) : io(i), defer(d) {}

  bool serving(const peer_type&) const { return !closed; }
  bool notice_arrived(const std::shared_ptr<peer_type>& p, sl::notice n) {
    got.push_back(n);
    if (!defer) return true;
    asio::post(io, [w = weak_from_this(), p] { sd::acknowledge_notice(w, p); });
    return false;
  }
  void sender_left(const std::shared_ptr<peer_type>& p, std::error_code ec) {
    ++left;
    why = ec;
    closed = true;
    std::error_code ignored;
    p->socket.close(ignored);
  }
};

void receiver_side(std::string_view in, bool defer) {
  asio::io_context io;
  auto [ours, peer] = socket_pair(io);
  auto listener = std::make_shared<receiving>(io, defer);
  auto source = std::make_shared<peer_type>(std::move(ours));
  source->sender = 3;
  sd::serve_notices(std::weak_ptr<receiving>(listener), source);
  source.reset();
  peer->send(in);
  peer->stop_sending();
  peer->drain();
  io.run();

  std::vector<sl::notice> want;
  std::error_code want_why = make_error_code(sl::errc::peer_disconnected);
  std::size_t at = 0;
  for (; at + sd::notice_bytes <= in.size(); at += sd::notice_bytes) {
    sd::notice_frame f{};
    std::memcpy(f.data(), in.data() + at, f.size());
    sl::notice n;
    if ((want_why = sd::decode_notice(f, 3, n))) break;
    want.push_back(n);
    want_why = make_error_code(sl::errc::peer_disconnected);
  }
  FUZZ_CHECK(listener->left == 1);
  FUZZ_CHECK(listener->why == want_why);
  FUZZ_CHECK(listener->got == want);
  FUZZ_CHECK(peer->received() == in.substr(0, want.size() * sd::notice_bytes));  // each echoed
}

struct sending {
  explicit sending(socket_type s) : link(std::move(s)) {}
  sd::notice_link<socket_type, sending> link;
  std::vector<std::uint64_t> acked;
  int ended = 0;
  std::error_code why;
  void notice_acknowledged(std::uint64_t tag) { acked.push_back(tag); }
  void control_ended(std::error_code ec) {
    ++ended;
    why = ec;
  }
};

void sender_side(std::string_view in, std::size_t count) {
  asio::io_context io;
  auto [ours, peer] = socket_pair(io);
  auto listener = std::make_shared<sending>(std::move(ours));
  std::vector<sd::notice_frame> frames;
  for (std::size_t i = 0; i < count; ++i)
    frames.push_back(sd::encode_notice(static_cast<sl::notice_kind>(1 + i % 4), static_cast<std::uint32_t>(i + 1)));
  listener->link.watch(listener);
  for (std::size_t i = 0; i < count; ++i) listener->link.send(frames[i], 100 + i);
  peer->send(in);
  peer->stop_sending();
  peer->drain();
  io.run();

  std::vector<std::uint64_t> want;
  std::error_code want_why = make_error_code(sl::errc::peer_disconnected);
  for (std::size_t at = 0; at + sd::notice_bytes <= in.size(); at += sd::notice_bytes) {
    const auto i = want.size();
    if (i >= count || std::memcmp(frames[i].data(), in.data() + at, sd::notice_bytes) != 0) {
      want_why = make_error_code(sl::errc::protocol_error);
      break;
    }
    want.push_back(100 + i);
  }
  FUZZ_CHECK(listener->ended == 1);
  FUZZ_CHECK(listener->why == want_why);
  FUZZ_CHECK(listener->acked == want);
  FUZZ_CHECK(!listener->link.is_open());
  // The frames went out in order: the peer read a prefix of them, the first one at least.
  std::string all;
  for (const auto& f : frames) all.append(reinterpret_cast<const char*>(f.data()), f.size());
  const auto& got = peer->received();
  FUZZ_CHECK(got.size() >= sd::notice_bytes && got.size() % sd::notice_bytes == 0);
  FUZZ_CHECK(all.compare(0, got.size(), got) == 0);
  listener->link.close();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > max_socket_input) return 0;
  const auto in = bytes_of(data + 1, size - 1);
  receiver_side(in, data[0] & 1);
  sender_side(in, 1 + ((data[0] >> 1) & 3));
  return 0;
}
