// RAII for the file descriptors and mappings of the shm transport, the SCM_RIGHTS exchange
// that hands a receiver's arenas to each sender, and the system calls that keep either side
// safe from the other: sealed arenas, bounded pre-faulting, probing a socket file's owner.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

namespace shardline::detail {

inline std::error_code last_system_error() noexcept {
  return {errno, std::system_category()};
}

/// A move-only owned file descriptor (libunifex's safe_file_descriptor).
class unique_fd {
public:
  unique_fd() = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) {
      close();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~unique_fd() { close(); }

  bool valid() const noexcept { return fd_ >= 0; }
  int get() const noexcept { return fd_; }
  void close() noexcept {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
  }

private:
  int fd_ = -1;
};

/// A move-only mmap'ed range, unmapped on destruction.
class mapping {
public:
  mapping() = default;
  mapping(void* data, std::size_t size) noexcept : data_(static_cast<std::byte*>(data)), size_(size) {}
  mapping(mapping&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapping& operator=(mapping&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~mapping() { reset(); }

  /// Maps `size` bytes of `fd` shared; an empty mapping and `ec` set on failure.
  static mapping map_shared(int fd, std::size_t size, int extra_flags, std::error_code& ec) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | extra_flags, fd, 0);
    if (p == MAP_FAILED) {
      ec = last_system_error();
      return {};
    }
    ec.clear();
    return {p, size};
  }

  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::span<std::byte> bytes() const noexcept { return {data_, size_}; }
  void reset() noexcept {
    if (data_) ::munmap(std::exchange(data_, nullptr), std::exchange(size_, 0));
  }

private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// The kernel's limit on descriptors in one SCM_RIGHTS message (SCM_MAX_FD).
inline constexpr std::size_t max_fds_per_message = 253;

/// Sends `data` with `fds` attached as SCM_RIGHTS, without blocking. Short sends fail:
/// the message is tiny and goes out first on a fresh socket.
inline std::error_code send_with_fds(int socket, std::span<const std::byte> data,
                                     std::span<const int> fds) {
  if (fds.size() > max_fds_per_message) return std::make_error_code(std::errc::argument_list_too_long);
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  iovec iov{const_cast<std::byte*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t n;
  do n = ::sendmsg(socket, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0) return last_system_error();
  if (static_cast<std::size_t>(n) != data.size()) return std::make_error_code(std::errc::message_size);
  return {};
}

/// Receives up to `data.size()` bytes and the descriptors attached to them, without
/// blocking. Returns the byte count (0 at EOF); `truncated` when descriptors were dropped.
inline std::size_t receive_with_fds(int socket, std::span<std::byte> data, std::vector<unique_fd>& fds,
                                    bool& truncated, std::error_code& ec) {
  std::vector<char> control(CMSG_SPACE(sizeof(int) * max_fds_per_message));
  iovec iov{data.data(), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t n;
  do n = ::recvmsg(socket, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    ec = last_system_error();
    return 0;
  }
  ec.clear();
  truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      fds.emplace_back(fd);
    }
  }
  return static_cast<std::size_t>(n);
}

/// The seals an arena carries before it is shared: its size can never change again, so no
/// page a sender mapped can be pulled away (a shrunk file would SIGBUS the sender's copies).
inline constexpr int arena_seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

/// "F_SEAL_SHRINK|F_SEAL_GROW", "none": for messages.
inline std::string seal_names(int seals) {
  static constexpr std::pair<int, const char*> known[] = {{F_SEAL_SEAL, "F_SEAL_SEAL"},
                                                          {F_SEAL_SHRINK, "F_SEAL_SHRINK"},
                                                          {F_SEAL_GROW, "F_SEAL_GROW"},
                                                          {F_SEAL_WRITE, "F_SEAL_WRITE"}};
  std::string out;
  for (const auto& [bit, name] : known)
    if (seals & bit) out += (out.empty() ? "" : "|") + std::string(name);
  return out.empty() ? "none" : out;
}

/// Faults in, for writing, the pages of [offset, offset + length) of `map` now rather than
/// in the first copies. A page that cannot be provided fails here with EFAULT where a copy
/// would have died of SIGBUS. Kernels before 5.14 lack MADV_POPULATE_WRITE: nothing is
/// pre-faulted there, and that is no error.
inline std::error_code prefault(const mapping& map, std::size_t offset, std::size_t length) noexcept {
#ifdef MADV_POPULATE_WRITE
  if (length == 0) return {};
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t first = offset / page * page;
  const std::size_t end = std::min(map.size(), (offset + length + page - 1) / page * page);
  int rc;
  do rc = ::madvise(map.data() + first, end - first, MADV_POPULATE_WRITE);
  while (rc != 0 && errno == EINTR);
  if (rc != 0 && errno != EINVAL) return last_system_error();
#else
  (void)map, (void)offset, (void)length;
#endif
  return {};
}

/// Who holds the socket file a receiver is about to listen at.
enum class socket_owner {
  none,   ///< no file there
  stale,  ///< a socket file nobody listens on (its receiver is gone): it may be replaced
  live,   ///< a process listens there: never delete it
};

/// Finds out by connecting, without blocking: a full backlog counts as live. `ec` is set
/// when the answer is unknown (e.g. the file is not ours to connect to).
inline socket_owner probe_socket_owner(const std::string& path, std::error_code& ec) noexcept {
  ec.clear();
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) {
    ec = std::make_error_code(std::errc::filename_too_long);
    return socket_owner::none;
  }
  unique_fd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!probe.valid()) {
    ec = last_system_error();
    return socket_owner::none;
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int rc;
  do rc = ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  while (rc != 0 && errno == EINTR);
  if (rc == 0 || errno == EAGAIN || errno == EINPROGRESS) return socket_owner::live;
  if (errno == ECONNREFUSED) return socket_owner::stale;
  if (errno == ENOENT) return socket_owner::none;
  ec = last_system_error();
  return socket_owner::live;
}

}  // namespace shardline::detail
