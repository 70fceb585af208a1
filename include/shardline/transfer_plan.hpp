// shardline/transfer_plan.hpp: which staging bytes go to which receiver at which offset —
// fused parameters, sliced for tensor-parallel receivers, fanned out to replicas, bucketed
// by a byte budget.
#pragma once

#include <shardline/error.hpp>
#include <shardline/parameter.hpp>
#include <shardline/shard_map.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace shardline {

/// How tensor-parallel receivers slice a destination parameter.
///  - replicate: every receiver holds the whole parameter.
///  - rows: dim 0 *of each shard*, as vLLM lays out fused parameters: rank r's qkv_proj is
///    [q rows of r; k rows of r; v rows of r]; for MoE w13 [E, 2I, H] each expert's gate and
///    up [I, H] are split on their dim 0 (the receiver holds [E, 2I/tp, H]).
///  - columns: the last dim of the whole parameter (o_proj [H, H] -> [H, H/tp]); strided,
///    one write per row.
enum class tp_split { replicate, rows, columns };

inline std::string_view to_string(tp_split s) noexcept {
  switch (s) {
    case tp_split::replicate: return "replicate";
    case tp_split::rows: return "rows";
    case tp_split::columns: return "columns";
  }
  return "unknown";
}

/// The default split: scalars, 1-D tensors and names containing "norm" replicate; o_proj,
/// down_proj and w2 (a name component "o_proj", "down_proj", or one starting with "w2",
/// e.g. "w2_weight") split by columns; everything else by rows.
inline tp_split default_split(const parameter_descriptor& p) {
  if (p.shape.size() <= 1 || p.name.find("norm") != std::string::npos) return tp_split::replicate;
  std::string_view rest = p.name;
  while (!rest.empty()) {
    const std::size_t dot = rest.find('.');
    const std::string_view part = rest.substr(0, dot);
    if (part == "o_proj" || part == "down_proj" || part.starts_with("w2")) return tp_split::columns;
    rest = dot == std::string_view::npos ? std::string_view{} : rest.substr(dot + 1);
  }
  return tp_split::rows;
}

struct plan_options {
  std::size_t tensor_parallel = 1;  ///< receivers of one replica, each takes 1/tp
  std::size_t replicas = 1;         ///< fan-out: identical receiver groups (receiver = replica*tp + rank)
  std::uint64_t bucket_bytes = 64ull << 20;  ///< byte budget of a bucket (staging bytes, padding included)
  /// Which split a destination parameter uses when tensor_parallel > 1 (ignored at 1).
  /// Empty: default_split.
  std::function<tp_split(const parameter_descriptor&)> split;
  /// Each parameter starts at a multiple of this inside its bucket's staging slot, so a
  /// loader may write any dtype there directly. A power of two.
  std::uint64_t staging_alignment = 256;
};

/// One write: `bytes` bytes of the parameter's staging image, starting at `staging_offset`
/// *relative to the parameter's start* (planned_parameter::staging_offset inside the bucket's
/// slot), go to `destination_offset` inside the parameter on receiver `receiver`. So the
/// source address is slot + parameter.staging_offset + write.staging_offset.
struct planned_write {
  std::size_t receiver = 0;
  std::uint64_t staging_offset = 0;
  std::uint64_t destination_offset = 0;
  std::uint64_t bytes = 0;
  friend bool operator==(const planned_write&, const planned_write&) = default;
};

struct planned_parameter {
  fused_parameter parameter;          ///< full (unsliced) layout, as loaded into staging
  std::uint64_t staging_offset = 0;   ///< where the full parameter starts inside the bucket's slot
  std::vector<planned_write> writes;  ///< to all receivers, ordered by receiver; contiguous runs coalesced
  tp_split split = tp_split::replicate;  ///< how receivers slice it (replicate when tp == 1)
  parameter_descriptor slice;         ///< what each receiver holds: same name and dtype, sliced shape
};

struct bucket {
  std::vector<planned_parameter> parameters;
  std::uint64_t staging_bytes = 0;  ///< end of its last parameter inside the slot
};

/// The complete, immutable plan of one model's transfer. Copyable; safe to read from
/// several threads.
class transfer_plan {
public:
  transfer_plan() = default;

  /// Fuses `sources` with `map`, slices for tensor parallelism, fans out to replicas and
  /// bucketizes by byte budget: parameters in first-appearance order, a fused parameter never
  /// split across buckets; one larger than the budget gets a bucket of its own.
  /// Throws shardline::error: what shard_map::fuse throws; errc::invalid_argument naming the
  /// option when tensor_parallel, replicas or bucket_bytes is 0 or staging_alignment is not a
  /// power of two; errc::invalid_argument naming the parameter (and shard) when a dim does not
  /// divide by tensor_parallel (rows: each shard's dim 0; columns: the last dim), or a scalar
  /// is to be split.
  static transfer_plan build(std::span<const parameter_descriptor> sources, const shard_map& map,
                             plan_options options = {}) {
    const auto bad_option = [](const std::string& what) {
      return error(make_error_code(errc::invalid_argument), "transfer_plan: " + what);
    };
    if (options.tensor_parallel == 0) throw bad_option("plan_options.tensor_parallel is 0, it must be at least 1");
    if (options.replicas == 0) throw bad_option("plan_options.replicas is 0, it must be at least 1");
    if (options.bucket_bytes == 0) throw bad_option("plan_options.bucket_bytes is 0, it must be at least 1");
    const std::uint64_t align = options.staging_alignment;
    if (align == 0 || (align & (align - 1)) != 0)
      throw bad_option("plan_options.staging_alignment is " + std::to_string(align) +
                       ", it must be a power of two");

    transfer_plan plan;
    plan.tp_ = options.tensor_parallel;
    plan.replicas_ = options.replicas;
    std::vector<fused_parameter> fused = map.fuse(sources);

    bucket current;
    const auto close = [&plan, &current] {
      if (current.parameters.empty()) return;
      plan.max_staging_ = std::max(plan.max_staging_, current.staging_bytes);
      plan.buckets_.push_back(std::move(current));
      current = {};
    };
    for (auto& f : fused) {
      planned_parameter p = slice(std::move(f), options);
      const std::uint64_t bytes = p.parameter.destination.bytes();
      plan.total_ += bytes;
      std::uint64_t at = (current.staging_bytes + align - 1) & ~(align - 1);
      if (!current.parameters.empty() && (at + bytes > options.bucket_bytes || at < current.staging_bytes)) {
        close();
        at = 0;
      }
      p.staging_offset = at;
      current.staging_bytes = at + bytes;
      current.parameters.push_back(std::move(p));
      // A parameter at or past the budget fills its bucket by itself.
      if (current.staging_bytes >= options.bucket_bytes) close();
    }
    close();

    for (std::size_t b = 0; b < plan.buckets_.size(); ++b)
      for (std::size_t i = 0; i < plan.buckets_[b].parameters.size(); ++i)
        plan.index_.emplace(plan.buckets_[b].parameters[i].parameter.destination.name,
                            std::pair{b, i});
    return plan;
  }

  const std::vector<bucket>& buckets() const noexcept { return buckets_; }
  std::size_t tensor_parallel() const noexcept { return tp_; }
  std::size_t replicas() const noexcept { return replicas_; }
  /// tensor_parallel * replicas.
  std::size_t receivers() const noexcept { return tp_ * replicas_; }
  /// The size of one staging slot: the largest bucket's staging_bytes.
  std::uint64_t max_staging_bytes() const noexcept { return max_staging_; }
  /// Sum of the full (unsliced) destination parameters' bytes.
  std::uint64_t total_bytes() const noexcept { return total_; }

  /// What receiver `receiver` must expose, in plan order: every destination parameter with
  /// its sliced shape, named as the destination. Throws shardline::error(errc::invalid_argument)
  /// when `receiver` >= receivers().
  std::vector<parameter_descriptor> receiver_parameters(std::size_t receiver) const {
    check_receiver(receiver);
    std::vector<parameter_descriptor> out;
    out.reserve(index_.size());
    for (const auto& b : buckets_)
      for (const auto& p : b.parameters) out.push_back(p.slice);
    return out;
  }

  /// The planned destination parameter named `destination`, or nullptr.
  const planned_parameter* find(std::string_view destination) const noexcept {
    const auto it = index_.find(destination);
    if (it == index_.end()) return nullptr;
    return &buckets_[it->second.first].parameters[it->second.second];
  }

  /// Checks what receiver `receiver` exposes (name and bytes() of each parameter; extra
  /// parameters are allowed) against the plan. Throws shardline::error naming the parameter,
  /// the receiver and both sizes: errc::unknown_parameter when a planned parameter is not
  /// exposed, errc::size_mismatch when the byte counts differ; errc::invalid_argument when
  /// `receiver` >= receivers().
  void validate_receiver(std::size_t receiver, std::span<const parameter_descriptor> exposed) const {
    check_receiver(receiver);
    std::unordered_map<std::string_view, std::uint64_t> sizes;
    for (const auto& e : exposed) sizes.try_emplace(e.name, e.bytes());
    for (const auto& b : buckets_)
      for (const auto& p : b.parameters) {
        const std::string& name = p.slice.name;
        const auto it = sizes.find(name);
        if (it == sizes.end())
          throw error(make_error_code(errc::unknown_parameter),
                      "parameter '" + name + "': receiver " + std::to_string(receiver) +
                          " does not expose it (the plan sends it " + std::to_string(p.slice.bytes()) +
                          " bytes, the receiver has 0)");
        if (it->second != p.slice.bytes())
          throw error(make_error_code(errc::size_mismatch),
                      "parameter '" + name + "': receiver " + std::to_string(receiver) +
                          " exposes " + std::to_string(it->second) + " bytes, the plan sends " +
                          std::to_string(p.slice.bytes()) + " bytes " + shape_string(p.slice.shape));
      }
  }

  /// The std::error_code overload of validate_receiver: sets `ec` instead of throwing.
  void validate_receiver(std::size_t receiver, std::span<const parameter_descriptor> exposed,
                         std::error_code& ec) const {
    ec.clear();
    try {
      validate_receiver(receiver, exposed);
    } catch (const error& e) {
      ec = e.code();
    }
  }

private:
  void check_receiver(std::size_t receiver) const {
    if (receiver >= receivers())
      throw error(make_error_code(errc::invalid_argument),
                  "transfer_plan: receiver " + std::to_string(receiver) + " does not exist (the plan has " +
                      std::to_string(receivers()) + " receivers)");
  }

  // The writes of one rank, then repeated for every replica.
  static planned_parameter slice(fused_parameter f, const plan_options& options) {
    const std::size_t tp = options.tensor_parallel;
    planned_parameter p;
    const parameter_descriptor& d = f.destination;
    p.split = tp == 1 ? tp_split::replicate : options.split ? options.split(d) : default_split(d);
    p.slice = d;
    const auto fail = [&d](const std::string& why) {
      return error(make_error_code(errc::invalid_argument),
                   "transfer_plan: parameter '" + d.name + "': " + why);
    };
    const std::string by_tp = "tensor_parallel " + std::to_string(tp);
    const std::uint64_t elem = size_of(d.type);
    std::vector<planned_write> rank;  // receiver left 0, filled per receiver below
    switch (p.split) {
      case tp_split::replicate:
        if (d.bytes() > 0) rank.push_back({0, 0, 0, d.bytes()});
        break;
      case tp_split::rows: {
        // Each shard's dim 0 sits at dim (destination rank - shard rank) of the destination.
        std::size_t dim = 0;
        for (const auto& s : f.shards) {
          if (s.tensor.shape.empty())
            throw fail("shard " + std::to_string(s.index) + " ('" + s.tensor.name +
                       "') is a scalar and cannot be split by rows for " + by_tp);
          const auto rows = static_cast<std::uint64_t>(s.tensor.shape[0]);
          if (rows % tp != 0)
            throw fail("shard " + std::to_string(s.index) + " ('" + s.tensor.name + "') has " +
                       std::to_string(rows) + " rows (dim 0), not divisible by " + by_tp);
          dim = d.shape.size() - s.tensor.shape.size();
        }
        if (!f.shards.empty()) p.slice.shape[dim] /= static_cast<std::int64_t>(tp);
        break;
      }
      case tp_split::columns: {
        if (d.shape.empty()) throw fail("a scalar cannot be split by columns for " + by_tp);
        const auto cols = static_cast<std::uint64_t>(d.shape.back());
        if (cols % tp != 0)
          throw fail("its last dim " + std::to_string(cols) + " (shape " + shape_string(d.shape) +
                     ") is not divisible by " + by_tp);
        p.slice.shape.back() /= static_cast<std::int64_t>(tp);
        break;
      }
      default:
        throw fail("the split function returned an unknown tp_split (" +
                   std::to_string(static_cast<int>(p.split)) + ")");
    }

    for (std::size_t replica = 0; replica < options.replicas; ++replica)
      for (std::size_t r = 0; r < tp; ++r) {
        const std::size_t receiver = replica * tp + r;
        if (p.split == tp_split::replicate) {
          for (auto w : rank) p.writes.push_back({receiver, w.staging_offset, w.destination_offset, w.bytes});
        } else if (p.split == tp_split::rows) {
          std::uint64_t cursor = 0;
          for (const auto& s : f.shards) {
            const std::uint64_t chunk = s.tensor.bytes() / tp;
            push(p.writes, {receiver, s.offset + r * chunk, cursor, chunk});
            cursor += chunk;
          }
        } else {
          const auto cols = static_cast<std::uint64_t>(d.shape.back());
          const std::uint64_t row_bytes = cols * elem, mine = row_bytes / tp;
          const std::uint64_t rows = cols == 0 ? 0 : d.elements() / cols;
          for (std::uint64_t i = 0; i < rows; ++i)
            push(p.writes, {receiver, i * row_bytes + r * mine, i * mine, mine});
        }
      }
    p.parameter = std::move(f);
    return p;
  }

  // Appends `w`, merged into the previous write when both sides continue it.
  static void push(std::vector<planned_write>& writes, planned_write w) {
    if (w.bytes == 0) return;
    if (!writes.empty()) {
      planned_write& last = writes.back();
      if (last.receiver == w.receiver && last.staging_offset + last.bytes == w.staging_offset &&
          last.destination_offset + last.bytes == w.destination_offset) {
        last.bytes += w.bytes;
        return;
      }
    }
    writes.push_back(w);
  }

  std::vector<bucket> buckets_;
  std::map<std::string, std::pair<std::size_t, std::size_t>, std::less<>> index_;
  std::size_t tp_ = 1;
  std::size_t replicas_ = 1;
  std::uint64_t max_staging_ = 0;
  std::uint64_t total_ = 0;
};

}  // namespace shardline
