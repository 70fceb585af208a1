// The sender's handshake (transport/detail/handshake.hpp, async_handshake_as_sender) against
// a receiver whose bytes the fuzzer chose, over a connected pair of Unix sockets in one
// io_context (the socket's connect is a no-op: the pair is connected already). Input: byte 0
// picks the magic and the identity; the rest is what the receiver sends before it hangs up.
// Each input runs four handshakes:
//   keyless      — the keyless overload (shm's), the bytes as they are;
//   no key given — the keyed overload with an empty key: a challenge is authentication_failed;
//   keyed        — a sender holding a key: the receiver's MAC cannot be forged, so it must
//                  fail, and it sends its proof only after a challenge;
//   prover       — a receiver holding the key: the input's first 32 bytes are its nonce, it
//                  checks the sender's proof, answers with its own MAC, then sends the rest.
#include "fuzz_handshake.hpp"

#include <asio/experimental/append.hpp>
#include <asio/post.hpp>

namespace {

using namespace fuzz;
using namespace std::chrono_literals;

constexpr auto deadline = 5s;

/// A socket of the pair, connected already: its connect completes at once.
class paired_socket : public socket_type {
public:
  using socket_type::socket_type;
  paired_socket(socket_type s) : socket_type(std::move(s)) {}
  template <class Handler>
  void async_connect(const endpoint_type&, Handler&& handler) {
    asio::post(get_executor(), asio::experimental::append(std::forward<Handler>(handler), std::error_code{}));
  }
};

/// The transport's own part after the verdict: reads a few bytes.
struct exchange {
  std::shared_ptr<std::array<char, exchange_bytes>> buffer = std::make_shared<std::array<char, exchange_bytes>>();
  template <class Handler>
  void operator()(paired_socket& s, Handler&& handler) const {
    asio::async_read(s, asio::buffer(*buffer), std::forward<Handler>(handler));
  }
};

enum class flavour { keyless, empty_key, keyed };

struct run_result {
  outcome o;
  std::string received;  // what the sender sent the receiver
};

template <class Script>
run_result handshake(std::string_view magic, const sl::sender_identity& who, flavour f, Script script) {
  asio::io_context io;
  auto [ours, peer] = socket_pair(io);
  auto socket = std::make_shared<paired_socket>(std::move(ours));
  run_result r;
  auto done = [&r, socket](std::error_code ec) {
    ++r.o.completions;
    r.o.ec = ec;
    std::error_code ignored;
    socket->close(ignored);
  };
  const asio::local::stream_protocol::endpoint nowhere;
  switch (f) {
    case flavour::keyless: sd::async_handshake_as_sender(socket, nowhere, magic, who, deadline, exchange{}, done); break;
    case flavour::empty_key:
      sd::async_handshake_as_sender(socket, nowhere, magic, who, deadline, std::optional<sl::shared_key>{}, exchange{},
                                    done);
      break;
    case flavour::keyed:
      sd::async_handshake_as_sender(socket, nowhere, magic, who, deadline, std::optional(the_key()), exchange{}, done);
      break;
  }
  script(*peer);
  io.run();
  r.received = peer->received();
  check_ended(r.o);
  return r;
}

/// What a sender must make of `verdict` then `rest` (keyless, or after the proofs held).
std::error_code expected(std::string_view verdict, std::string_view rest) {
  if (verdict.size() < sd::verdict_bytes) return make_error_code(sl::errc::peer_disconnected);
  std::array<std::byte, sd::verdict_bytes> v{};
  std::memcpy(v.data(), verdict.data(), v.size());
  if (auto refusal = sd::decode_verdict(v)) return refusal;
  return rest.size() >= exchange_bytes ? std::error_code{} : make_error_code(sl::errc::peer_disconnected);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > max_socket_input) return 0;
  const std::string_view magic = (data[0] & 1) ? "SLSH" : "SLVB";
  const sl::sender_identity who{std::uint32_t(data[0] >> 1), 0x0123456789abcdefull * data[0]};
  const std::string hello = [&] {
    const auto f = sd::encode_hello(magic, who);
    return std::string(reinterpret_cast<const char*>(f.data()), f.size());
  }();
  const auto in = bytes_of(data + 1, size - 1);
  const auto raw = [in](scripted_peer& p) {
    p.send(in);
    p.stop_sending();
    p.drain();
  };
  const auto lead = in.substr(0, std::min(in.size(), sd::verdict_bytes));
  const auto after_lead = in.substr(lead.size());
  const bool challenge = lead == sd::psk_challenge_tag;

  {  // keyless: a challenge is no verdict of ours (protocol_error)
    const auto r = handshake(magic, who, flavour::keyless, raw);
    FUZZ_CHECK(r.o.ec == expected(lead, after_lead));
    FUZZ_CHECK(r.received == hello);
  }
  {  // the keyed overload without a key: a challenge says the receiver wants one
    const auto r = handshake(magic, who, flavour::empty_key, raw);
    FUZZ_CHECK(r.o.ec == (challenge ? make_error_code(sl::errc::authentication_failed) : expected(lead, after_lead)));
    FUZZ_CHECK(r.received == hello);
  }
  {  // keyed, facing a receiver without the key
    const auto r = handshake(magic, who, flavour::keyed, raw);
    FUZZ_CHECK(r.o.ec);
    if (!challenge) {
      FUZZ_CHECK(r.received == hello);  // no proof to a receiver that did not ask for one
      if (lead.size() == sd::verdict_bytes)
        FUZZ_CHECK(r.o.ec == sd::not_a_challenge(*reinterpret_cast<const sd::verdict_frame*>(lead.data())));
    } else if (in.size() >= sd::psk_challenge_bytes) {
      FUZZ_CHECK(r.received.size() == sd::hello_bytes + sd::psk_proof_bytes);
      if (in.size() >= sd::psk_challenge_bytes + sd::psk_answer_bytes)
        FUZZ_CHECK(r.o.ec == sl::errc::authentication_failed || r.o.ec == sl::errc::protocol_error);
    }
  }
  {  // keyed, facing a receiver holding the key
    auto session = std::make_shared<sd::psk_session>(the_key());
    std::memcpy(session->challenge.data(), sd::psk_challenge_tag.data(), 4);
    const std::string nonce = take(in, 0, sd::psk_nonce_bytes);
    std::memcpy(session->challenge.data() + 4, nonce.data(), sd::psk_nonce_bytes);
    const auto rest = in.substr(std::min(in.size(), sd::psk_nonce_bytes));
    bool proved = false;
    const auto verifier = [&](scripted_peer& p) {
      p.send(std::string_view(reinterpret_cast<const char*>(session->challenge.data()), session->challenge.size()));
      p.expect(sd::hello_bytes + sd::psk_proof_bytes, [&p, &proved, session, magic, rest](bool ok) {
        if (ok) {
          std::memcpy(session->proof.data(), p.received().data() + sd::hello_bytes, sd::psk_proof_bytes);
          proved = !session->check_proof(magic, hello_of(p.received()));
          p.send(std::string_view(reinterpret_cast<const char*>(session->answer.data()), session->answer.size()));
          p.send(rest);
        }
        p.stop_sending();
        p.drain();
      });
    };
    const auto r = handshake(magic, who, flavour::keyed, verifier);
    FUZZ_CHECK(proved);
    FUZZ_CHECK(r.received.substr(0, sd::hello_bytes) == hello);
    const auto verdict = rest.substr(0, std::min(rest.size(), sd::verdict_bytes));
    FUZZ_CHECK(r.o.ec == expected(verdict, rest.substr(verdict.size())));
  }
  return 0;
}
