// The receiver's handshake (transport/detail/handshake.hpp, async_handshake_as_receiver)
// against a peer whose bytes the fuzzer chose, over a connected pair of Unix sockets in one
// io_context. Input: byte 0 configures the judge and the magic; the rest is what the peer
// sends before it hangs up. Each input runs three handshakes:
//   keyless  — the peer's bytes as they are;
//   keyed    — the same bytes to a receiver holding a key: no MAC can be forged, so it must
//              fail, never judge the hello, and send nothing but its challenge and a failed
//              status;
//   prover   — a peer holding the key: the input's first 20 bytes are its hello, the next
//              32 its nonce, it answers the challenge with the right MAC, then sends the rest.
// Each must end once, never by its deadline, with exactly the outcome the bytes call for.
#include "fuzz_handshake.hpp"

#include <asio/experimental/append.hpp>
#include <asio/post.hpp>

namespace {

using namespace fuzz;
using namespace std::chrono_literals;

constexpr auto deadline = 5s;

/// Hands over the one socket of the pair, as an acceptor would a connected peer's.
struct pair_acceptor {
  socket_type* ready;
  template <class Handler>
  void async_accept(socket_type& s, Handler&& handler) {
    s = std::move(*ready);
    asio::post(s.get_executor(), asio::experimental::append(std::forward<Handler>(handler), std::error_code{}));
  }
};

enum class verdict_mode { admit, refuse, retry_then_admit, retry_forever };

struct judge_log {
  verdict_mode mode = verdict_mode::admit;
  unsigned retries = 0;  // retry_then_admit: how many times to say retry
  unsigned asked = 0;
  std::array<char, exchange_bytes> exchange{};
};

struct hooks {
  std::shared_ptr<judge_log> log;

  sd::judgement judge(const sl::sender_identity&) const {
    const unsigned n = log->asked++;
    switch (log->mode) {
      case verdict_mode::admit: return {};
      case verdict_mode::refuse: return {make_error_code(sl::errc::plan_mismatch)};
      case verdict_mode::retry_then_admit: return {{}, n < log->retries};
      case verdict_mode::retry_forever: return {make_error_code(sl::errc::invalid_argument), true};
    }
    return {};
  }

  template <class Handler>
  void operator()(socket_type& s, const sl::sender_identity&, Handler&& handler) const {
    asio::async_read(s, asio::buffer(log->exchange), std::forward<Handler>(handler));
  }
};

/// The outcome a receiver must reach for `hello` followed by `rest`, the peer having proved
/// the key (or none being asked).
std::error_code expected(std::string_view magic, std::string_view hello, std::string_view rest,
                         const judge_log& log, sl::sender_identity& who) {
  who = {};
  if (hello.size() < sd::hello_bytes) return make_error_code(sl::errc::peer_disconnected);
  sl::sender_identity parsed;
  if (auto bad = sd::decode_hello(magic, hello_of(hello), parsed)) return bad;
  who = parsed;
  switch (log.mode) {
    case verdict_mode::refuse: return make_error_code(sl::errc::plan_mismatch);
    case verdict_mode::retry_forever: return make_error_code(sl::errc::invalid_argument);
    case verdict_mode::retry_then_admit:  // asked too often, the judge's refusal (none) holds
    case verdict_mode::admit: break;
  }
  return rest.size() >= exchange_bytes ? std::error_code{} : make_error_code(sl::errc::peer_disconnected);
}

struct run_result {
  outcome o;
  std::string received;  // what the receiver sent the peer
  unsigned judged = 0;
};

/// One handshake; `script` drives the peer.
template <class Script>
run_result handshake(std::string_view magic, const std::optional<sl::shared_key>& key, const judge_log& config,
                     Script script) {
  asio::io_context io;
  auto [ours, peer] = socket_pair(io);
  auto socket = std::make_shared<socket_type>(io);
  pair_acceptor acceptor{&ours};
  auto log = std::make_shared<judge_log>(config);
  run_result r;
  auto done = [&r, socket](std::error_code ec, sl::sender_identity who) {
    ++r.o.completions;
    r.o.ec = ec;
    r.o.who = who;
    std::error_code ignored;
    socket->close(ignored);  // an admitted peer is let go: its drain ends
  };
  if (key) sd::async_handshake_as_receiver(acceptor, socket, magic, deadline, key, hooks{log}, done);
  else sd::async_handshake_as_receiver(acceptor, socket, magic, deadline, hooks{log}, done);
  script(*peer);
  io.run();
  r.received = peer->received();
  r.judged = log->asked;
  check_ended(r.o);
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > max_socket_input) return 0;
  judge_log config;
  config.mode = static_cast<verdict_mode>(data[0] & 3);
  config.retries = (data[0] >> 2) & 31;
  if (config.mode == verdict_mode::retry_then_admit && (data[0] & 0x80)) config.retries = sd::max_judge_retries + 1;
  const std::string_view magic = (data[0] & 0x40) ? "SLSH" : "SLVB";
  const auto in = bytes_of(data + 1, size - 1);
  const auto raw = [in](scripted_peer& p) {
    p.send(in);
    p.stop_sending();
    p.drain();
  };

  {  // keyless
    const auto r = handshake(magic, std::nullopt, config, raw);
    sl::sender_identity who;
    const auto want = expected(magic, in.substr(0, std::min(in.size(), sd::hello_bytes)),
                               in.substr(std::min(in.size(), sd::hello_bytes)), config, who);
    FUZZ_CHECK(r.o.ec == want);
    FUZZ_CHECK(same(r.o.who, who));
    // The peer hears the verdict once a hello was read, nothing before: 0 or 4 bytes.
    if (in.size() < sd::hello_bytes) FUZZ_CHECK(r.received.empty());
    else FUZZ_CHECK(r.received.size() == sd::verdict_bytes);
    if (!want) FUZZ_CHECK(r.received == std::string(4, '\0'));
  }

  {  // keyed, the peer not holding the key
    const auto r = handshake(magic, the_key(), config, raw);
    FUZZ_CHECK(r.o.ec);
    FUZZ_CHECK(r.judged == 0);
    FUZZ_CHECK(same(r.o.who, {}));
    if (in.size() < sd::hello_bytes) FUZZ_CHECK(r.received.empty());
    else FUZZ_CHECK(r.received.size() == sd::psk_challenge_bytes ||
                    r.received.size() == sd::psk_challenge_bytes + sd::psk_answer_bytes);
    if (!r.received.empty()) FUZZ_CHECK(r.received.substr(0, 4) == sd::psk_challenge_tag);
    if (r.received.size() > sd::psk_challenge_bytes) {
      FUZZ_CHECK(r.o.ec == sl::errc::authentication_failed);
      std::string failed(sd::psk_answer_bytes, '\0');
      failed[0] = static_cast<char>(sl::errc::authentication_failed);
      FUZZ_CHECK(r.received.substr(sd::psk_challenge_bytes) == failed);
    }
  }

  {  // keyed, the peer proving the key
    const std::string hello = take(in, 0, sd::hello_bytes);
    const std::string nonce = take(in, sd::hello_bytes, sd::psk_nonce_bytes);
    const auto rest = in.substr(std::min(in.size(), sd::hello_bytes + sd::psk_nonce_bytes));
    auto session = std::make_shared<sd::psk_session>(the_key());
    const auto prover = [&](scripted_peer& p) {
      p.send(hello);
      p.expect(sd::psk_challenge_bytes, [&p, session, hello, nonce, rest, magic](bool ok) {
        if (ok) {
          std::memcpy(session->challenge.data(), p.received().data(), sd::psk_challenge_bytes);
          const auto mac = session->mac(sd::psk_role::sender, magic, hello_of(hello),
                                        reinterpret_cast<const std::byte*>(nonce.data()));
          std::memcpy(session->proof.data(), nonce.data(), sd::psk_nonce_bytes);
          std::memcpy(session->proof.data() + sd::psk_nonce_bytes, mac.data(), mac.size());
          p.send(std::string_view(reinterpret_cast<const char*>(session->proof.data()), session->proof.size()));
          p.send(rest);
        }
        p.stop_sending();
        p.drain();
      });
    };
    const auto r = handshake(magic, the_key(), config, prover);
    sl::sender_identity who;
    const auto want = expected(magic, hello, rest, config, who);
    FUZZ_CHECK(r.o.ec == want);
    FUZZ_CHECK(same(r.o.who, who));
    // Challenge, an answer carrying the receiver's own proof, then the verdict.
    FUZZ_CHECK(r.received.size() == sd::psk_challenge_bytes + sd::psk_answer_bytes + sd::verdict_bytes);
    std::memcpy(session->answer.data(), r.received.data() + sd::psk_challenge_bytes, sd::psk_answer_bytes);
    FUZZ_CHECK(!session->check_answer(magic, hello_of(hello)));
    if (!want) FUZZ_CHECK(r.received.substr(sd::psk_challenge_bytes + sd::psk_answer_bytes) == std::string(4, '\0'));
  }
  return 0;
}
