// shardline/trace.hpp: optional timeline of an update (loads, barriers, writes, commit),
// written as Chrome trace JSON (opens in Perfetto or chrome://tracing).
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <ostream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace shardline {

/// Tracks of the timeline, one row each in the viewer.
enum class trace_track : int { loader = 1, barrier = 2, write = 3, commit = 4 };

/// The tracer used when tracing is off: every call is an empty inline function, so a
/// pipeline built with it carries no tracing cost at all.
struct no_tracer {
  static constexpr bool enabled = false;
  using clock = std::chrono::steady_clock;
  void span(trace_track, std::string_view, std::string_view, clock::time_point,
            clock::time_point) noexcept {}
};

/// Records complete events ("ph":"X") in memory. Single-threaded, like the pipeline
/// that feeds it.
class chrome_tracer {
public:
  static constexpr bool enabled = true;
  using clock = std::chrono::steady_clock;

  chrome_tracer() : origin_(clock::now()) {}

  /// One span on `track`, e.g. ("load", "model.layers.0.self_attn.q_proj.weight").
  void span(trace_track track, std::string_view category, std::string_view name,
            clock::time_point start, clock::time_point end) {
    events_.push_back({track, std::string(category), std::string(name), start, end});
  }

  std::size_t size() const noexcept { return events_.size(); }
  void clear() noexcept { events_.clear(); }

  void write(std::ostream& out) const {
    out << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
    static constexpr const char* track_names[] = {"", "load", "barrier", "write", "commit"};
    for (int t = 1; t <= 4; ++t)
      out << "{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":1,\"tid\":" << t
          << ",\"args\":{\"name\":\"" << track_names[t] << "\"}},\n";
    bool first = true;
    for (const auto& e : events_) {
      if (!first) out << ",\n";
      first = false;
      out << "{\"ph\":\"X\",\"pid\":1,\"tid\":" << static_cast<int>(e.track) << ",\"cat\":\"";
      escape(out, e.category);
      out << "\",\"name\":\"";
      escape(out, e.name);
      out << "\",\"ts\":" << micros(e.start) << ",\"dur\":" << micros(e.end) - micros(e.start)
          << '}';
    }
    out << "\n]}\n";
  }

  /// Writes the JSON to `path`; the error names the path.
  void write_file(const std::string& path, std::error_code& ec) const {
    std::ofstream file(path, std::ios::trunc);
    if (file) write(file);
    ec = file ? std::error_code{} : std::make_error_code(std::errc::io_error);
  }

private:
  struct event {
    trace_track track;
    std::string category, name;
    clock::time_point start, end;
  };

  double micros(clock::time_point t) const {
    return std::chrono::duration<double, std::micro>(t - origin_).count();
  }
  static void escape(std::ostream& out, std::string_view s) {
    for (char c : s) {
      if (c == '"' || c == '\\') out << '\\';
      if (static_cast<unsigned char>(c) >= 0x20) out << c;
    }
  }

  clock::time_point origin_;
  std::vector<event> events_;
};

}  // namespace shardline
