// shardline/transport.hpp: what every transport (loopback, shm, verbs) provides.
#pragma once

#include <shardline/memory.hpp>

#include <concepts>
#include <cstdint>
#include <span>
#include <system_error>
#include <utility>

namespace shardline {

namespace detail {
/// A completion handler used only to check, in the concepts below, that an operation
/// is an Asio initiating function with the signature void(std::error_code).
struct write_completion_probe {
  void operator()(std::error_code) const {}
};
struct notification_completion_probe {
  void operator()(std::error_code, std::uint32_t) const {}
};
}  // namespace detail

/// A sender's connection to one receiver.
///
/// - `remote_regions()`: the region table the receiver sent while connecting.
/// - `async_write(batch, token)`: every request of `batch` lands in the receiver's memory;
///   completes with void(std::error_code) once all have landed (or one failed). The span
///   of requests is read during initiation; the source bytes must stay valid and
///   unmodified until completion.
/// - `async_write_notify(batch, notification, token)`: as async_write, then the receiver's
///   `async_wait_notification` completes with `notification`, strictly after the batch's
///   bytes are visible there. The pipeline sends its commit this way.
/// - `close()`: pending operations complete with an error; later ones fail with
///   errc::not_connected. Never throws.
template <class C>
concept transport_connection =
    requires(C& c, const C& cc, std::span<const write_request> batch, std::uint32_t notification) {
      typename C::executor_type;
      { c.get_executor() } -> std::convertible_to<typename C::executor_type>;
      { cc.remote_regions() } -> std::same_as<const region_table&>;
      { cc.is_open() } -> std::same_as<bool>;
      c.async_write(batch, detail::write_completion_probe{});
      c.async_write_notify(batch, notification, detail::write_completion_probe{});
      c.close();
    };

/// A receiver endpoint: memory its peer may write, exposed by name.
///
/// - `get_executor()`: where its completions run (the rollout's io_context).
/// - `allocate(bytes)`: an arena the peer may write into (mapped or registered once).
/// - `expose(name, bytes)`: names a sub-range of an allocated arena in the region table.
/// - `async_wait_notification(token)`: completes with void(std::error_code, std::uint32_t)
///   for each async_write_notify of the sender, in order.
template <class R>
concept transport_receiver =
    requires(R& r, const R& cr, std::span<std::byte> bytes, std::size_t n) {
      r.get_executor();
      { r.allocate(n) } -> std::same_as<std::span<std::byte>>;
      r.expose(std::string{}, bytes);
      { cr.regions() } -> std::same_as<const region_table&>;
      r.async_wait_notification(detail::notification_completion_probe{});
      r.close();
    };

/// A transport: a domain that registers the sender's local memory once per arena
/// (`register_memory(bytes)` returns an RAII registration whose `region()` is a
/// local_region), its connection type and its receiver type.
template <class T>
concept transport =
    requires(T& t, std::span<std::byte> bytes, const typename T::registration& reg) {
      typename T::executor_type;
      typename T::connection;
      typename T::receiver;
      typename T::registration;
      { t.get_executor() } -> std::convertible_to<typename T::executor_type>;
      { t.register_memory(bytes) } -> std::same_as<typename T::registration>;
      { reg.region() } -> std::same_as<local_region>;
    } && transport_connection<typename T::connection> &&
    transport_receiver<typename T::receiver>;

}  // namespace shardline
