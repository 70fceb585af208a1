// shardline/weights_receiver.hpp: the rollout side. Exposes the parameters one receiver
// holds (laid out in one arena, or the inference engine's own tensors, or a shadow copy of
// either), announces a version only once every sender that writes here committed it, and says
// when memory is dirty.
#pragma once

#include <shardline/error.hpp>
#include <shardline/memory.hpp>
#include <shardline/plan/parameter.hpp>
#include <shardline/plan/transfer_plan.hpp>
#include <shardline/transport/concepts.hpp>

#include <asio/async_result.hpp>
#include <asio/associated_executor.hpp>
#include <asio/bind_executor.hpp>
#include <asio/compose.hpp>
#include <asio/dispatch.hpp>
#include <asio/experimental/append.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

namespace shardline {

/// One tensor an inference engine already owns, handed to a receiver to adopt.
struct engine_tensor {
  std::string name;
  dtype type = dtype::bf16;
  std::vector<std::int64_t> shape;
  std::span<std::byte> bytes;
  memory_location location{};
};

/// One shadow -> live copy at commit: a parameter (adopt mode) or the whole arena (layout mode).
struct shadow_copy {
  std::span<const std::byte> from;  ///< in the shadow (host memory the transport allocated)
  std::span<std::byte> to;          ///< live memory
  memory_location to_location{};    ///< where `to` lives
};

/// What copies a committed shadow into live memory in place of memcpy, so that live tensors
/// may be memory memcpy cannot write (cuda_device: shardline/cuda/gpudirect.hpp's
/// cuda::device_commit_copy). `copy` runs on the receiver's executor with every copy of one
/// committed version, returns once every byte is live, and throws std::system_error (e.g.
/// shardline::error) when it cannot: the version then fails to commit with that code.
struct commit_copier {
  memory_kinds kinds;  ///< the live memory kinds it writes
  std::function<void(std::span<const shadow_copy>)> copy;
};

/// How a weights_receiver holds what its senders write.
struct receiver_options {
  /// Where each parameter starts in an arena the receiver lays out (its parameters in layout
  /// mode, the shadow in adopt mode): a multiple of this power of two.
  std::size_t alignment = 256;
  /// Senders write into a shadow: arenas the receiver allocates through its endpoint, laid
  /// out like the live parameters and exposed instead of them. When a version commits, every
  /// parameter is copied shadow -> live before the version is announced, so live memory is
  /// never half-written. Costs twice the memory and one local copy of every byte per version.
  /// Host memory only (memcpy), unless commit_copy is set.
  bool shadow = false;
  /// With a shadow: the commit's copy (unset: memcpy, live memory host or host_pinned only).
  commit_copier commit_copy{};
};

/// Whether the receiver's memory holds one whole version.
struct memory_state {
  using clock = std::chrono::steady_clock;
  bool dirty = false;                    ///< some live bytes may be of a version that did not commit
  std::optional<std::uint32_t> committed;  ///< the last version whose every byte landed
  std::uint32_t target = 0;              ///< dirty: the version the memory was moving to
  clock::time_point since{};             ///< dirty: when the first sender began it
  std::string reason;                    ///< dirty: why, e.g. "sender 2 disconnected while writing version 5"
  /// Shadow mode only: the shadow holds part of a version that did not commit. Live memory
  /// then stays clean (`dirty` is false) and still holds `committed`; target, since and reason
  /// describe the shadow.
  bool shadow_dirty = false;
};

/// Owns the layout, never the bytes senders write: either the transport receiver's single
/// arena (allocated, mapped or registered once for all parameters) or the engine's tensors.
/// With receiver_options::shadow, senders write into one shadow arena the transport
/// allocates; the live bytes (the engine's tensors, or in layout mode a buffer this object
/// owns) are never exposed and change only when a version commits.
///
/// Thread safety: use from the receiver's executor.
template <transport_receiver Receiver>
class weights_receiver {
public:
  /// Lays out `parameters` (each aligned to `alignment` bytes) in one arena and exposes each
  /// with its layout; one sender (id 0), any plan. Throws shardline::error
  /// (errc::invalid_argument) naming a parameter given twice.
  weights_receiver(Receiver& endpoint, std::vector<parameter_descriptor> parameters,
                   std::size_t alignment = 256)
      : weights_receiver(endpoint, std::move(parameters), receiver_options{alignment}) {}

  /// The same, with options (a shadow copy: see receiver_options). Also throws
  /// errc::invalid_argument for an alignment that is not a power of two.
  weights_receiver(Receiver& endpoint, std::vector<parameter_descriptor> parameters, receiver_options options)
      : endpoint_(endpoint), parameters_(std::move(parameters)), quorum_{0}, shadow_(options.shadow), commit_copy_(std::move(options.commit_copy)) {
    lay_out(options.alignment);
    endpoint_.admit({1, 0});
  }

  /// Lays out what receiver `receiver` of `plan` holds, accepts exactly the plan's senders
  /// built from this plan (its fingerprint), and announces a version once every sender that
  /// writes to this receiver committed it. Throws what transfer_plan::receiver_parameters
  /// throws.
  weights_receiver(Receiver& endpoint, const transfer_plan& plan, std::size_t receiver,
                   std::size_t alignment = 256)
      : weights_receiver(endpoint, plan, receiver, receiver_options{alignment}) {}

  /// The same, with options (a shadow copy: see receiver_options).
  weights_receiver(Receiver& endpoint, const transfer_plan& plan, std::size_t receiver, receiver_options options)
      : endpoint_(endpoint), parameters_(plan.receiver_parameters(receiver)),
        quorum_(plan.receiver_senders(receiver)), shadow_(options.shadow),
        commit_copy_(std::move(options.commit_copy)) {
    lay_out(options.alignment);
    endpoint_.admit({static_cast<std::uint32_t>(plan.senders()), plan.fingerprint()});
  }

  /// Adopts the engine's own tensors for what receiver `receiver` of `plan` holds: the
  /// transport registers exactly those bytes. Every planned parameter must be among
  /// `tensors` (others are ignored). Throws shardline::error naming the tensor:
  /// errc::invalid_argument for a name given twice, a span whose size is not its layout's
  /// bytes, a tensor not aligned to its element size, two tensors that overlap;
  /// errc::unknown_parameter for a planned parameter missing from `tensors`;
  /// errc::layout_mismatch for another dtype or shape than the plan's; what the transport's
  /// expose() throws (e.g. errc::unsupported_memory where it cannot share such memory).
  ///
  /// With options.shadow the transport exposes a shadow arena it allocated (laid out with
  /// options.alignment) and never the engine's tensors, so they may be memory it cannot
  /// share (plain memory under shm); a tensor of a kind the commit's copy cannot write
  /// (cuda_device without options.commit_copy) throws errc::unsupported_memory naming it.
  weights_receiver(Receiver& endpoint, const transfer_plan& plan, std::size_t receiver,
                   std::vector<engine_tensor> tensors, receiver_options options = {})
      : endpoint_(endpoint), parameters_(plan.receiver_parameters(receiver)),
        quorum_(plan.receiver_senders(receiver)), shadow_(options.shadow),
        commit_copy_(std::move(options.commit_copy)) {
    adopt(std::move(tensors), options.alignment);
    endpoint_.admit({static_cast<std::uint32_t>(plan.senders()), plan.fingerprint()});
  }

  /// The parameter's live memory (with a shadow, what the last committed version left).
  /// Throws shardline::error(errc::unknown_parameter) naming it.
  std::span<std::byte> parameter(std::string_view name) const {
    auto it = spans_.find(std::string(name));
    if (it == spans_.end())
      throw error(make_error_code(errc::unknown_parameter),
                  "weights_receiver: unknown parameter '" + std::string(name) + "'");
    return it->second;
  }

  const std::vector<parameter_descriptor>& parameters() const noexcept { return parameters_; }
  /// Whether senders write into a shadow copy (receiver_options::shadow).
  bool shadowed() const noexcept { return shadow_; }
  Receiver& endpoint() noexcept { return endpoint_; }
  /// The senders whose commits announce a version here.
  const std::vector<std::uint32_t>& quorum() const noexcept { return quorum_; }

  /// The last version whose every byte landed, if any.
  std::optional<std::uint32_t> committed_version() const noexcept { return state_.committed; }
  /// Clean, or dirty with the version it was moving to, since when and why. With a shadow,
  /// live memory is never dirty: shadow_dirty says a version that did not commit (or has not
  /// yet) is partly in the shadow.
  const memory_state& state() const noexcept { return state_; }
  /// Why the last notice was refused (errc::unknown_sender, errc::stale_version,
  /// errc::protocol_error), naming the sender, e.g. "sender 1 committed version 5 without
  /// beginning it".
  const std::string& last_refusal() const noexcept { return last_refusal_; }

  /// Completion void(std::error_code, std::uint32_t version). Succeeds when a version
  /// commits: every sender of the quorum committed it, so every byte of it is here (with a
  /// shadow: copied into live memory, on this executor, before the completion). Fails
  /// with errc::version_abandoned (and that version) when the version in progress can no
  /// longer commit: a sender of the quorum aborted it, withdrew it, or disconnected while
  /// writing it (state().reason names the sender); the next version, or a new attempt at
  /// the same one, starts afresh. Fails with errc::unknown_sender for a notice from a sender
  /// outside the quorum, errc::stale_version for a begin at or below the committed version,
  /// errc::protocol_error for a commit or abort of a version its sender did not begin (never,
  /// or it began another): such a notice never counts toward the quorum (last_refusal() names
  /// the sender and what it did), and with the endpoint's error when it is closed. A sender that disconnects between versions is not
  /// an error (a restarted trainer reconnects).
  template <class Token>
  auto async_wait_commit(Token&& token) {
    return asio::async_compose<Token, void(std::error_code, std::uint32_t)>(
        commit_op{this}, token, endpoint_.get_executor());
  }

private:
  struct commit_op {
    weights_receiver* self;
    enum class step { start, wait, done } at = step::start;
    template <class Self>
    void operator()(Self& op, std::error_code ec = {}, notice n = {}) {
      if (at == step::done) return op.complete(ec, n.version);
      if (at == step::wait) {
        if (auto outcome = self->take(ec, n)) {
          // take() ran on the endpoint's executor; the handler completes on its own.
          at = step::done;
          const auto ex = asio::get_associated_executor(op, self->endpoint_.get_executor());
          return asio::dispatch(ex, asio::experimental::append(std::move(op), outcome->first,
                                                               notice{0, notice_kind::commit, outcome->second}));
        }
      }
      at = step::wait;
      // Notices are taken on the endpoint's executor whatever the handler's (use_future's is
      // the system pool): neither this object nor the endpoint is thread-safe.
      self->endpoint_.async_wait_notification(asio::bind_executor(self->endpoint_.get_executor(), std::move(op)));
    }
  };

  // Each parameter's offset in one arena, aligned; the arena's size last.
  std::vector<std::size_t> arena_offsets(std::size_t alignment) const {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
      throw error(make_error_code(errc::invalid_argument),
                  "weights_receiver: alignment " + std::to_string(alignment) + " is not a power of two");
    std::vector<std::size_t> offsets;
    offsets.reserve(parameters_.size() + 1);
    std::size_t total = 0;
    for (const auto& p : parameters_) {
      total = (total + alignment - 1) / alignment * alignment;
      offsets.push_back(total);
      total += static_cast<std::size_t>(p.bytes());
    }
    offsets.push_back(std::max<std::size_t>(total, 1));
    return offsets;
  }

  void lay_out(std::size_t alignment) {
    const auto offsets = arena_offsets(alignment);
    const std::size_t total = offsets.back();
    arena_ = endpoint_.allocate(total);
    // With a shadow the live parameters have the arena's layout in memory of their own, so
    // the commit copies them with one memcpy.
    std::span<std::byte> live = arena_;
    if (shadow_) {
      const std::align_val_t aligned{std::max(alignment, alignof(std::max_align_t))};
      live_storage_ = owned_bytes(static_cast<std::byte*>(::operator new[](total, aligned)), {aligned});
      live = {live_storage_.get(), total};
      std::memset(live.data(), 0, total);
      copies_.push_back({arena_, live, memory_location::host()});
    }
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto& p = parameters_[i];
      if (!spans_.emplace(p.name, live.subspan(offsets[i], p.bytes())).second)
        throw error(make_error_code(errc::invalid_argument),
                    "weights_receiver: parameter '" + p.name + "' given twice");
      endpoint_.expose({p.name, arena_.subspan(offsets[i], p.bytes()), memory_location::host(),
                        tensor_layout{p.type, p.shape}});
    }
  }

  void adopt(std::vector<engine_tensor> tensors, std::size_t alignment) {
    const auto fail = [](errc e, const std::string& why) {
      return error(make_error_code(e), "weights_receiver: " + why);
    };
    std::unordered_map<std::string, std::size_t> by_name;
    std::map<const std::byte*, std::size_t> by_address;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const parameter_descriptor d{t.name, t.type, t.shape};
      if (!by_name.emplace(t.name, i).second)
        throw fail(errc::invalid_argument, "tensor '" + t.name + "' given twice");
      if (t.bytes.size() != d.bytes())
        throw fail(errc::invalid_argument, "tensor " + describe(d) + " needs " + std::to_string(d.bytes()) +
                                               " bytes, its span has " + std::to_string(t.bytes.size()));
      const auto element = size_of(t.type);
      if (element > 1 && reinterpret_cast<std::uintptr_t>(t.bytes.data()) % element != 0)
        throw fail(errc::invalid_argument, "tensor '" + t.name + "' is not aligned to its " +
                                               std::to_string(element) + "-byte elements");
      if (t.bytes.empty()) continue;
      if (const auto [at, inserted] = by_address.emplace(t.bytes.data(), i); !inserted)
        throw fail(errc::invalid_argument,
                   "tensors '" + tensors[at->second].name + "' and '" + t.name + "' overlap");
    }
    // Sorted by address, an overlap can only be with the next tensor.
    for (auto it = by_address.begin(); it != by_address.end(); ++it) {
      const auto next = std::next(it);
      if (next == by_address.end()) break;
      const auto& a = tensors[it->second];
      if (a.bytes.data() + a.bytes.size() > next->first)
        throw fail(errc::invalid_argument,
                   "tensors '" + a.name + "' and '" + tensors[next->second].name + "' overlap");
    }
    for (const auto& p : parameters_) {
      const auto it = by_name.find(p.name);
      if (it == by_name.end())
        throw fail(errc::unknown_parameter, "the engine has no tensor '" + p.name + "' (the plan sends " +
                                                describe(p) + ")");
      const auto& t = tensors[it->second];
      const tensor_layout planned{p.type, p.shape}, held{t.type, t.shape};
      if (planned != held)
        throw fail(errc::layout_mismatch, "tensor '" + p.name + "' is " + to_string(held) + ", the plan sends " +
                                              to_string(planned));
    }
    if (shadow_) return adopt_shadowed(tensors, by_name, alignment);
    if constexpr (requires { endpoint_.exposable_kinds(); })  // what this endpoint takes as configured
      for (const auto& p : parameters_)
        require_kind(endpoint_.exposable_kinds(), tensors[by_name.at(p.name)].location, "the transport",
                     "tensor '" + p.name + "'");
    else if constexpr (requires { Receiver::destination_kinds; })
      for (const auto& p : parameters_)
        require_kind(Receiver::destination_kinds, tensors[by_name.at(p.name)].location, "the transport",
                     "tensor '" + p.name + "'");
    for (const auto& p : parameters_) {
      auto& t = tensors[by_name.at(p.name)];
      endpoint_.expose({p.name, t.bytes, t.location, tensor_layout{t.type, t.shape}});
      spans_.emplace(p.name, t.bytes);
    }
  }

  // The engine's tensors stay unexposed; the transport shares one shadow arena laid out like
  // them, each parameter copied to its tensor at commit.
  void adopt_shadowed(const std::vector<engine_tensor>& tensors,
                      const std::unordered_map<std::string, std::size_t>& by_name, std::size_t alignment) {
    for (const auto& p : parameters_) {
      const auto& t = tensors[by_name.at(p.name)];
      const bool host = t.location.kind == memory_kind::host || t.location.kind == memory_kind::host_pinned;
      if (commit_copy_.copy ? !commit_copy_.kinds.contains(t.location.kind) : !host)
        throw error(make_error_code(errc::unsupported_memory),
                    "weights_receiver: tensor '" + p.name + "' is " + to_string(t.location) + " memory: " +
                        (commit_copy_.copy ? "receiver_options::commit_copy writes " + commit_copy_.kinds.describe()
                                           : std::string("its shadow copy needs a device copy from the CUDA part "
                                                         "(receiver_options::commit_copy = "
                                                         "cuda::device_commit_copy(), shardline/cuda/gpudirect.hpp); "
                                                         "memcpy copies host and host_pinned memory")));
    }
    const auto offsets = arena_offsets(alignment);
    arena_ = endpoint_.allocate(offsets.back());
    copies_.reserve(parameters_.size());
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto& p = parameters_[i];
      const auto& t = tensors[by_name.at(p.name)];
      const auto shadow = arena_.subspan(offsets[i], t.bytes.size());
      endpoint_.expose({p.name, shadow, memory_location::host(), tensor_layout{t.type, t.shape}});
      spans_.emplace(p.name, t.bytes);
      copies_.push_back({shadow, t.bytes, t.location});
    }
  }

  // The committed version goes live: every shadow byte, copied in place of the last one.
  // A failed commit_copy leaves live memory dirty (part of it may be copied): the version
  // fails with its code, state().reason says why.
  std::optional<std::pair<std::error_code, std::uint32_t>> publish_shadow(std::uint32_t version) {
    if (!commit_copy_.copy) {
      for (const auto& c : copies_)
        if (!c.to.empty()) std::memcpy(c.to.data(), c.from.data(), c.to.size());
      return std::nullopt;
    }
    try {
      commit_copy_.copy(copies_);
      return std::nullopt;
    } catch (const std::system_error& failure) {
      state_.dirty = true;
      state_.target = version;
      state_.since = memory_state::clock::now();
      state_.reason = "copying the shadow of version " + std::to_string(version) +
                      " into live memory failed: " + failure.what();
      active_ = false;
      return std::pair{failure.code(), version};
    }
  }

  // The flag of the memory senders write: live memory, or the shadow.
  bool& written_dirty() noexcept { return shadow_ ? state_.shadow_dirty : state_.dirty; }

  bool in_quorum(std::uint32_t s) const noexcept {
    return std::find(quorum_.begin(), quorum_.end(), s) != quorum_.end();
  }

  void abandon(std::string why) {
    abandoned_ = true;
    state_.reason = std::move(why);
  }

  // One notice (or a sender leaving) applied to the version in progress; a result when the
  // waiter's operation completes.
  std::optional<std::pair<std::error_code, std::uint32_t>> take(std::error_code ec, const notice& n) {
    const std::string who = "sender " + std::to_string(n.sender);
    const std::string what = " version " + std::to_string(target_);
    if (ec == errc::peer_disconnected) {
      // A sender that comes back (a restarted trainer) begins afresh.
      open_.erase(n.sender);
      const bool was_writing = active_ && !abandoned_ && began(n.sender) && !committed(n.sender);
      if (!was_writing) return std::nullopt;
      abandon(who + " disconnected while writing" + what);
      return std::pair{make_error_code(errc::version_abandoned), target_};
    }
    if (ec) return std::pair{ec, std::uint32_t{0}};
    if (!in_quorum(n.sender)) {
      last_refusal_ = who + " sent a " + std::string(to_string(n.kind)) + " notice but is not a sender of this receiver";
      return std::pair{make_error_code(errc::unknown_sender), n.version};
    }
    if (auto violation = out_of_sequence(n)) {
      last_refusal_ = who + " " + *violation;
      return std::pair{make_error_code(errc::protocol_error), n.version};
    }
    // Versions move forward: one at or below the last committed is a stale notice, refused.
    if (state_.committed && n.version <= *state_.committed && n.kind == notice_kind::begin) {
      last_refusal_ = who + " began version " + std::to_string(n.version) + ", not after the committed version " +
                      std::to_string(*state_.committed);
      return std::pair{make_error_code(errc::stale_version), n.version};
    }
    // A new version, or a new attempt at an abandoned one (a restarted trainer pushes it again).
    if (n.kind == notice_kind::begin && (!active_ || n.version != target_ || abandoned_)) {
      active_ = true;
      target_ = n.version;
      abandoned_ = false;
      began_.clear();
      committed_.clear();
      if (!written_dirty()) {
        written_dirty() = true;
        state_.target = n.version;
        state_.since = memory_state::clock::now();
        state_.reason = "receiving version " + std::to_string(n.version);
        clean_before_ = true;
      } else {
        clean_before_ = false;
        state_.target = n.version;
      }
    }
    if (!active_ || n.version != target_) return std::nullopt;  // a stale notice
    const std::string about = " version " + std::to_string(n.version);
    switch (n.kind) {
      case notice_kind::begin:
        began_.push_back(n.sender);
        return std::nullopt;
      case notice_kind::commit:
        if (abandoned_) return std::nullopt;
        committed_.push_back(n.sender);
        if (!std::all_of(quorum_.begin(), quorum_.end(), [this](std::uint32_t s) { return committed(s); }))
          return std::nullopt;
        if (shadow_)
          if (auto failed = publish_shadow(n.version)) return failed;
        state_ = {false, n.version, 0, {}, {}, false};
        active_ = false;
        return std::pair{std::error_code{}, n.version};
      case notice_kind::abort:
        if (abandoned_) return std::nullopt;
        abandon(who + " aborted" + about + " after writing part of it");
        return std::pair{make_error_code(errc::version_abandoned), n.version};
      case notice_kind::withdraw: {
        began_.erase(std::remove(began_.begin(), began_.end(), n.sender), began_.end());
        // Nothing of this version was written by anyone: the memory is as it was.
        const bool was_abandoned = abandoned_;
        abandon(who + " withdrew" + about + " before writing any of it");
        if (began_.empty() && clean_before_) {
          written_dirty() = false;
          state_.reason.clear();
          active_ = false;
        }
        if (was_abandoned) return std::nullopt;
        return std::pair{make_error_code(errc::version_abandoned), n.version};
      }
    }
    return std::nullopt;
  }

  // Each sender's own sequence: begin V, then its commit, abort or withdraw of V. A commit or
  // abort of a version the sender is not in (never began, or began another) is a protocol
  // violation of that sender: what it says of its writes cannot be true, so it never counts.
  // A begin refused as stale still opens its version, so that its commit is a stale notice,
  // not a violation. Returns what the sender did wrong, or nothing (and tracks the sequence).
  std::optional<std::string> out_of_sequence(const notice& n) {
    const auto it = open_.find(n.sender);
    const std::string what = std::string(n.kind == notice_kind::commit ? "committed" : "aborted") + " version " +
                             std::to_string(n.version);
    switch (n.kind) {
      case notice_kind::begin:
        open_[n.sender] = n.version;
        return std::nullopt;
      case notice_kind::commit:
      case notice_kind::abort:
        if (it == open_.end()) return what + " without beginning it";
        if (it->second != n.version) return what + " while in version " + std::to_string(it->second);
        open_.erase(it);
        return std::nullopt;
      case notice_kind::withdraw:
        // Also says "not taking part" in a version the sender never began: allowed.
        if (it != open_.end() && it->second == n.version) open_.erase(it);
        return std::nullopt;
    }
    return std::nullopt;
  }

  bool began(std::uint32_t s) const noexcept { return std::find(began_.begin(), began_.end(), s) != began_.end(); }
  bool committed(std::uint32_t s) const noexcept {
    return std::find(committed_.begin(), committed_.end(), s) != committed_.end();
  }

  struct aligned_delete {
    std::align_val_t alignment;
    void operator()(std::byte* p) const noexcept { ::operator delete[](p, alignment); }
  };
  using owned_bytes = std::unique_ptr<std::byte[], aligned_delete>;
  Receiver& endpoint_;
  std::vector<parameter_descriptor> parameters_;
  std::vector<std::uint32_t> quorum_;
  bool shadow_ = false;
  commit_copier commit_copy_;
  std::span<std::byte> arena_;  // what the transport exposes: the parameters, or their shadow
  owned_bytes live_storage_{nullptr, {std::align_val_t{alignof(std::max_align_t)}}};  // layout mode + shadow
  std::vector<shadow_copy> copies_;
  std::unordered_map<std::string, std::span<std::byte>> spans_;  // live bytes, by name
  memory_state state_;
  std::string last_refusal_;
  // The version in progress: who began it, who committed it, whether it can still commit.
  bool active_ = false;
  bool abandoned_ = false;
  bool clean_before_ = false;
  std::uint32_t target_ = 0;
  std::vector<std::uint32_t> began_;
  std::vector<std::uint32_t> committed_;
  // The version each sender of the quorum began and has not yet committed, aborted or withdrawn.
  std::unordered_map<std::uint32_t, std::uint32_t> open_;
};

}  // namespace shardline
