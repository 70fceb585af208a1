// shardline/weights_receiver.hpp: the rollout side. Lays out the parameters in one arena,
// exposes each to the sender and surfaces committed versions.
#pragma once

#include <shardline/error.hpp>
#include <shardline/parameter.hpp>
#include <shardline/transport.hpp>

#include <asio/async_result.hpp>
#include <asio/compose.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <vector>

namespace shardline {

/// Owns nothing but the layout: the memory is the transport receiver's single arena,
/// allocated (mapped or registered) once for all parameters.
///
/// Thread safety: use from the receiver's executor.
template <transport_receiver Receiver>
class weights_receiver {
public:
  /// Allocates one arena for `parameters` (each aligned to `alignment` bytes) and exposes
  /// each under its name. Throws shardline::error(errc::invalid_argument) naming a parameter
  /// given twice.
  weights_receiver(Receiver& endpoint, std::vector<parameter_descriptor> parameters,
                   std::size_t alignment = 256)
      : endpoint_(endpoint), parameters_(std::move(parameters)) {
    std::vector<std::uint64_t> offsets;
    std::uint64_t total = 0;
    for (const auto& p : parameters_) {
      total = (total + alignment - 1) / alignment * alignment;
      offsets.push_back(total);
      total += p.bytes();
    }
    arena_ = endpoint_.allocate(static_cast<std::size_t>(std::max<std::uint64_t>(total, 1)));
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto& p = parameters_[i];
      auto bytes = arena_.subspan(offsets[i], p.bytes());
      if (!spans_.emplace(p.name, bytes).second)
        throw error(make_error_code(errc::invalid_argument),
                    "weights_receiver: parameter '" + p.name + "' given twice");
      endpoint_.expose(p.name, bytes);
    }
  }

  /// The parameter's memory. Throws shardline::error(errc::unknown_parameter) naming it.
  std::span<std::byte> parameter(std::string_view name) const {
    auto it = spans_.find(std::string(name));
    if (it == spans_.end())
      throw error(make_error_code(errc::unknown_parameter),
                  "weights_receiver: unknown parameter '" + std::string(name) + "'");
    return it->second;
  }

  const std::vector<parameter_descriptor>& parameters() const noexcept { return parameters_; }
  Receiver& endpoint() noexcept { return endpoint_; }

  /// The last version whose every byte landed, if any.
  std::optional<std::uint32_t> committed_version() const noexcept { return committed_; }

  /// Completes with void(std::error_code, std::uint32_t version) when the sender commits
  /// the next version: every byte of it has landed here before this completes.
  template <class Token>
  auto async_wait_commit(Token&& token) {
    return asio::async_compose<Token, void(std::error_code, std::uint32_t)>(
        commit_op{this}, token, endpoint_.get_executor());
  }

private:
  struct commit_op {
    weights_receiver* self;
    bool started = false;
    template <class Self>
    void operator()(Self& op, std::error_code ec = {}, std::uint32_t version = 0) {
      if (!started) {
        started = true;
        self->endpoint_.async_wait_notification(std::move(op));
        return;
      }
      if (!ec) self->committed_ = version;
      op.complete(ec, version);
    }
  };

  Receiver& endpoint_;
  std::vector<parameter_descriptor> parameters_;
  std::span<std::byte> arena_;
  std::unordered_map<std::string, std::span<std::byte>> spans_;
  std::optional<std::uint32_t> committed_;
};

}  // namespace shardline
