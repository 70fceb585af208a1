// The far end of a socket under fuzzing: a peer in the same io_context that sends what the
// fuzzer chose (writes are synchronous and small: they land in the socket buffer at once),
// reads what the side under test sends, and keeps every byte it read for the checks.
#pragma once

#include "fuzz_check.hpp"

#include <asio/buffer.hpp>
#include <asio/io_context.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>

#include <array>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace fuzz {

using socket_type = asio::local::stream_protocol::socket;

/// Inputs longer than this are skipped by the socket targets: what a peer sends then always
/// fits in the socket's buffer, so a synchronous write never waits for the side under test.
inline constexpr std::size_t max_socket_input = 16 * 1024;

class scripted_peer : public std::enable_shared_from_this<scripted_peer> {
public:
  explicit scripted_peer(socket_type s) : socket_(std::move(s)) {}

  void send(std::string_view bytes) {
    std::error_code ignored;  // the side under test may have hung up: that is its right
    asio::write(socket_, asio::buffer(bytes.data(), bytes.size()), ignored);
  }

  /// No more bytes from this peer: the side under test reads end of file.
  void stop_sending() {
    std::error_code ignored;
    socket_.shutdown(asio::socket_base::shutdown_send, ignored);
  }

  /// Reads exactly `n` more bytes (kept in received()), then calls `then(ok)`.
  void expect(std::size_t n, std::function<void(bool)> then) {
    buffer_.resize(n);
    asio::async_read(socket_, asio::buffer(buffer_),
                     [self = shared_from_this(), then = std::move(then)](std::error_code ec, std::size_t got) {
                       self->received_.append(self->buffer_.data(), got);
                       then(!ec);
                     });
  }

  /// Reads everything until the side under test closes its end.
  void drain() {
    socket_.async_read_some(asio::buffer(chunk_), [self = shared_from_this()](std::error_code ec, std::size_t got) {
      self->received_.append(self->chunk_.data(), got);
      if (!ec) self->drain();
    });
  }

  void close() {
    std::error_code ignored;
    socket_.close(ignored);
  }

  const std::string& received() const noexcept { return received_; }

private:
  socket_type socket_;
  std::string buffer_;
  std::array<char, 4096> chunk_{};
  std::string received_;
};

/// A connected pair: the side under test's socket and the peer.
inline std::pair<socket_type, std::shared_ptr<scripted_peer>> socket_pair(asio::io_context& io) {
  socket_type ours(io), theirs(io);
  asio::local::connect_pair(ours, theirs);
  return {std::move(ours), std::make_shared<scripted_peer>(std::move(theirs))};
}

/// Bytes [at, at + n) of `in`, zero-padded to n.
inline std::string take(std::string_view in, std::size_t at, std::size_t n) {
  std::string s(n, '\0');
  if (at < in.size()) s.replace(0, std::min(n, in.size() - at), in.substr(at, n));
  return s;
}

}  // namespace fuzz
