// shardline/transport/concepts.hpp: what every transport (loopback, shm, verbs) provides, and the
// control notices a sender sends its receivers around the writes of one version.
#pragma once

#include <shardline/memory.hpp>

#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>
#include <utility>

namespace shardline {

/// What a sender announces to a receiver about one version of the weights.
///  - begin: writes of `version` are about to start (the receiver's memory is dirty from now
///    until a version commits);
///  - commit: every write of this sender for `version` has completed;
///  - abort: this sender's update of `version` failed or was cancelled after it wrote: it
///    will not commit, and what it wrote is partial;
///  - withdraw: this sender's update of `version` stopped before it wrote any byte.
enum class notice_kind : std::uint8_t { begin = 1, commit = 2, abort = 3, withdraw = 4 };

inline std::string_view to_string(notice_kind k) noexcept {
  switch (k) {
    case notice_kind::begin: return "begin";
    case notice_kind::commit: return "commit";
    case notice_kind::abort: return "abort";
    case notice_kind::withdraw: return "withdraw";
  }
  return "unknown";
}

/// A notice as a receiver gets it: from which sender, what, for which version.
struct notice {
  std::uint32_t sender = 0;
  notice_kind kind = notice_kind::commit;
  std::uint32_t version = 0;
  friend bool operator==(const notice&, const notice&) = default;
};

/// Who a sender is, said at connect time: its id (trainer rank) and the fingerprint of the
/// plan it was built from (0: no plan; only a receiver that admits any plan accepts it).
struct sender_identity {
  std::uint32_t sender = 0;
  std::uint64_t plan_fingerprint = 0;
};

/// Whom a receiver accepts: sender ids below `senders` (0: any id) built from the plan with
/// `plan_fingerprint` (0: any plan). A sender outside it is refused at connect time
/// (errc::unknown_sender, errc::plan_mismatch), before it learns any region.
struct admission {
  std::uint32_t senders = 0;
  std::uint64_t plan_fingerprint = 0;

  /// The reason `who` is refused, or success.
  std::error_code check(const sender_identity& who) const noexcept {
    if (senders != 0 && who.sender >= senders) return make_error_code(errc::unknown_sender);
    if (plan_fingerprint != 0 && who.plan_fingerprint != plan_fingerprint)
      return make_error_code(errc::plan_mismatch);
    return {};
  }
};

namespace detail {
/// Completion handlers used only to check, in the concepts below, that an operation is an
/// Asio initiating function with the given signature.
struct write_completion_probe {
  void operator()(std::error_code) const {}
};
struct notice_completion_probe {
  void operator()(std::error_code, notice) const {}
};
}  // namespace detail

/// A sender's connection to one receiver.
///
/// - `remote_regions()`: the region table the receiver sent while connecting.
/// - `async_write(batch, token)`: every request of `batch` lands in the receiver's memory;
///   completes with void(std::error_code) once all have landed (or one failed). The span
///   of requests is read during initiation; the source bytes must stay valid and
///   unmodified until completion. A failed or cancelled write never leaves the connection
///   unusable unless the transport itself failed (is_open() then says false).
/// - `async_notify(kind, version, token)`: delivers notice {this sender, kind, version} to
///   the receiver, after every write that completed before this call; completes with
///   void(std::error_code) only once the receiver acknowledged it, so success means the
///   receiving process holds the notice. A receiver that dies before acknowledging fails it
///   with errc::peer_disconnected.
/// - `close()`: pending operations complete with an error; later ones fail with
///   errc::not_connected. The receiver sees the sender leave. Never throws.
template <class C>
concept transport_connection =
    requires(C& c, const C& cc, std::span<const write_request> batch, notice_kind kind,
             std::uint32_t version) {
      typename C::executor_type;
      { c.get_executor() } -> std::convertible_to<typename C::executor_type>;
      { cc.remote_regions() } -> std::same_as<const region_table&>;
      { cc.is_open() } -> std::same_as<bool>;
      c.async_write(batch, detail::write_completion_probe{});
      c.async_notify(kind, version, detail::write_completion_probe{});
      c.close();
    };

/// A receiver endpoint: memory its senders may write, exposed by name.
///
/// - `get_executor()`: where its completions run (the rollout's io_context).
/// - `allocate(bytes)`: an arena the senders may write into (mapped or registered once).
/// - `expose(exposure)`: names a byte range, with its location and layout, in the region
///   table: a sub-range of an allocated arena, or memory the caller owns (an inference
///   engine's tensors) where the transport can register it; where it cannot, it throws
///   shardline::error saying so. `expose(name, bytes)`: a host byte region.
/// - `admit(admission)`: whom it accepts from now on.
/// - `async_wait_notification(token)`: completes with void(std::error_code, notice) for each
///   notice of each sender, in each sender's order; when a sender leaves, with
///   errc::peer_disconnected and a notice naming that sender (kind abort, version 0), and the
///   receiver goes on serving the others.
template <class R>
concept transport_receiver =
    requires(R& r, const R& cr, std::span<std::byte> bytes, std::size_t n, exposure e) {
      r.get_executor();
      { r.allocate(n) } -> std::same_as<std::span<std::byte>>;
      r.expose(std::move(e));
      r.expose(std::string{}, bytes);
      r.admit(admission{});
      { cr.regions() } -> std::same_as<const region_table&>;
      r.async_wait_notification(detail::notice_completion_probe{});
      r.close();
    };

/// A transport: a domain that registers the sender's local memory once per arena
/// (`register_memory(bytes, location)` returns an RAII registration whose `region()` is a
/// local_region), its connection type, its receiver type, and the memory kinds it can read
/// from (`source_kinds`) and write to (`destination_kinds`).
template <class T>
concept transport =
    requires(T& t, std::span<std::byte> bytes, memory_location where,
             const typename T::registration& reg) {
      typename T::executor_type;
      typename T::connection;
      typename T::receiver;
      typename T::registration;
      { T::source_kinds } -> std::convertible_to<memory_kinds>;
      { T::destination_kinds } -> std::convertible_to<memory_kinds>;
      { t.get_executor() } -> std::convertible_to<typename T::executor_type>;
      { t.register_memory(bytes, where) } -> std::same_as<typename T::registration>;
      { reg.region() } -> std::same_as<local_region>;
    } && transport_connection<typename T::connection> &&
    transport_receiver<typename T::receiver>;

}  // namespace shardline
