// Ranks as processes, for the demo and the benchmarks: fork a child with a pipe each way.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <system_error>

namespace shardline::examples {

/// Forks `body(read_fd, write_fd)` (its exit status is the child's) with a pipe to it (we
/// write `to_child`) and one from it (we read `from_child`); returns the pid. Fork before
/// anything starts threads or polls: the child gets a copy of this process.
template <class Body>
pid_t fork_with_pipes(Body body, int& to_child, int& from_child) {
  int down[2], up[2];
  if (pipe(down) != 0 || pipe(up) != 0) throw std::system_error(errno, std::system_category(), "pipe");
  const pid_t pid = fork();
  if (pid < 0) throw std::system_error(errno, std::system_category(), "fork");
  if (pid == 0) {
    close(down[1]);
    close(up[0]);
    std::fflush(stdout);
    _exit(body(down[0], up[1]));
  }
  close(down[0]);
  close(up[1]);
  to_child = down[1];
  from_child = up[0];
  return pid;
}

}  // namespace shardline::examples
