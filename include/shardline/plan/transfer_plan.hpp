// shardline/plan/transfer_plan.hpp: which staging bytes go to which receiver at which offset —
// fused parameters, sliced for tensor-parallel receivers, fanned out to replicas, bucketed
// by a byte budget, and split among the senders (trainer ranks) that hold the source tensors.
#pragma once

#include <shardline/error.hpp>
#include <shardline/plan/parameter.hpp>
#include <shardline/plan/shard_map.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
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

  /// Senders (trainer ranks) that hold the source tensors; each executes
  /// transfer_plan::for_sender(s). Which sender holds which source is given by `sender_of`
  /// or by `sender_tensors` (not both); with neither, sender 0 holds every source.
  std::size_t senders = 1;
  /// The sender holding `source`, called once per source tensor. Empty: not used.
  std::function<std::size_t(const parameter_descriptor& source)> sender_of;
  /// sender_tensors[s]: the names of the source tensors sender s holds; every source exactly
  /// once over all senders. Empty: not used; otherwise it has `senders` entries.
  std::vector<std::vector<std::string>> sender_tensors;
};

/// One write: `bytes` bytes of the parameter's staging image, starting at `staging_offset`
/// *relative to the parameter's start* (planned_parameter::staging_offset inside the bucket's
/// slot), go to `destination_offset` inside the parameter on receiver `receiver`. So the
/// source address is slot + parameter.staging_offset + write.staging_offset.
///
/// Every byte of a write comes from shards of one sender, `sender`: a write is split where
/// the owning sender changes between shards, and consecutive shards of one sender stay in one
/// write.
struct planned_write {
  std::size_t receiver = 0;
  std::uint64_t staging_offset = 0;
  std::uint64_t destination_offset = 0;
  std::uint64_t bytes = 0;
  std::uint32_t sender = 0;  ///< the sender whose staging bytes these are
  std::uint32_t shard = 0;   ///< shard_source::index of the shard holding the first byte
  friend bool operator==(const planned_write&, const planned_write&) = default;
};

/// One destination parameter of a plan.
///
/// In a full plan (transfer_plan::build) `parameter` is the whole fused parameter: its shards
/// tile [0, destination.bytes()) and the staging image is the full destination layout. In a
/// sender plan (transfer_plan::for_sender) `parameter.shards` holds *only that sender's
/// shards*: they do not tile the destination; each shard's `index` is unchanged and its
/// `offset` is its place in the sender's compact staging image (its shards packed back to back
/// in index order), and `writes` are only that sender's, with staging offsets into that image.
struct planned_parameter {
  fused_parameter parameter;  ///< layout as loaded into staging (see above for sender plans)
  std::uint64_t staging_offset = 0;  ///< where the staging image starts inside the bucket's slot
  std::vector<planned_write> writes;  ///< to all receivers, ordered by receiver; contiguous runs coalesced
  tp_split split = tp_split::replicate;  ///< how receivers slice it (replicate when tp == 1)
  parameter_descriptor slice;  ///< what each receiver holds: same name and dtype, sliced shape
  std::size_t index = 0;  ///< position in the full plan (0..P-1), the same in every sender plan
  /// Bytes of the staging image: destination.bytes() in a full plan, the sum of the sender's
  /// shards in a sender plan.
  std::uint64_t staging_bytes = 0;
  std::vector<std::uint32_t> shard_senders;  ///< the sender of each of parameter.shards
};

struct bucket {
  std::vector<planned_parameter> parameters;
  std::uint64_t staging_bytes = 0;  ///< end of its last parameter inside the slot
  std::size_t first = 0;            ///< position of its first parameter in its plan
};

namespace detail {
// 64-bit FNV-1a over a canonical encoding: integers as LEB128 varints, strings and shapes
// prefixed by their length, so that no two different inputs share an encoding.
class fnv1a {
public:
  void u64(std::uint64_t v) noexcept {
    for (; v >= 0x80; v >>= 7) byte(static_cast<unsigned char>(v | 0x80));
    byte(static_cast<unsigned char>(v));
  }
  void str(std::string_view s) noexcept {
    u64(s.size());
    for (char c : s) byte(static_cast<unsigned char>(c));
  }
  void shape(const std::vector<std::int64_t>& s) noexcept {
    u64(s.size());
    for (std::int64_t d : s) u64(static_cast<std::uint64_t>(d));
  }
  std::uint64_t value() const noexcept { return h_; }

private:
  void byte(unsigned char c) noexcept { h_ = (h_ ^ c) * 1099511628211ull; }
  std::uint64_t h_ = 14695981039346656037ull;
};
}  // namespace detail

/// The complete, immutable plan of one model's transfer, or the part of it that one sender
/// executes (for_sender). Copyable; safe to read from several threads.
///
/// Parameters have a position in their plan (0..parameter_count()-1: bucket order, then order
/// inside the bucket) and a global index (planned_parameter::index, their position in the
/// full plan); in a full plan the two coincide.
class transfer_plan {
public:
  /// An empty full plan: one receiver, one sender, no parameters.
  transfer_plan() : fingerprint_(encode_header(1, 1, 1, 0).value()) {}

  /// Fuses `sources` with `map`, slices for tensor parallelism, fans out to replicas, assigns
  /// every shard to the sender holding its source tensor and bucketizes by byte budget:
  /// parameters in first-appearance order, a fused parameter never split across buckets; one
  /// larger than the budget gets a bucket of its own.
  ///
  /// Throws shardline::error:
  ///  - what shard_map::fuse throws;
  ///  - errc::invalid_argument naming the option when tensor_parallel, replicas, senders or
  ///    bucket_bytes is 0, senders does not fit 32 bits, staging_alignment is not a power of
  ///    two, both sender_of and sender_tensors are given, or sender_tensors does not have
  ///    `senders` entries;
  ///  - errc::invalid_argument naming the parameter (and shard) when a dim does not divide by
  ///    tensor_parallel (rows: each shard's dim 0; columns: the last dim), or a scalar is to be
  ///    split;
  ///  - errc::invalid_argument naming the source tensor when sender_of gives a sender >=
  ///    senders, sender_tensors lists it for two senders (or twice for one), or for none;
  ///  - errc::unknown_parameter naming the entry when sender_tensors names no source tensor.
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
    if (options.senders == 0) throw bad_option("plan_options.senders is 0, it must be at least 1");
    if (options.senders > std::numeric_limits<std::uint32_t>::max())
      throw bad_option("plan_options.senders is " + std::to_string(options.senders) +
                       ", it must fit 32 bits");
    if (options.sender_of && !options.sender_tensors.empty())
      throw bad_option("plan_options.sender_of and plan_options.sender_tensors are both given, "
                       "give one");
    if (!options.sender_tensors.empty() && options.sender_tensors.size() != options.senders)
      throw bad_option("plan_options.sender_tensors has " +
                       std::to_string(options.sender_tensors.size()) + " entries, plan_options.senders is " +
                       std::to_string(options.senders));

    std::vector<fused_parameter> fused = map.fuse(sources);
    const sender_table owners(sources, options);

    std::vector<planned_parameter> planned;
    planned.reserve(fused.size());
    for (std::size_t i = 0; i < fused.size(); ++i) {
      std::vector<std::uint32_t> shard_senders;
      shard_senders.reserve(fused[i].shards.size());
      for (const auto& s : fused[i].shards) shard_senders.push_back(owners(s.tensor));
      planned.push_back(slice(std::move(fused[i]), std::move(shard_senders), options));
      planned.back().index = i;
    }

    transfer_plan plan;
    plan.tp_ = options.tensor_parallel;
    plan.replicas_ = options.replicas;
    plan.senders_ = options.senders;
    plan.bucket_bytes_ = options.bucket_bytes;
    plan.alignment_ = align;
    plan.fingerprint_ = fingerprint_of(plan, planned);
    plan.quorum_.assign(plan.receivers(), {});
    for (const auto& p : planned)
      for (const auto& w : p.writes) {
        auto& q = plan.quorum_[w.receiver];
        if (q.empty() || q.back() != w.sender) q.push_back(w.sender);
      }
    for (auto& q : plan.quorum_) {
      std::sort(q.begin(), q.end());
      q.erase(std::unique(q.begin(), q.end()), q.end());
    }
    plan.place(std::move(planned));
    return plan;
  }

  /// The part of this plan sender `s` executes: the parameters of which `s` holds at least one
  /// shard, in the same order, each with only `s`'s shards and writes, staged as `s`'s compact
  /// image (see planned_parameter), re-bucketed with the same bucket_bytes and
  /// staging_alignment. index, fingerprint(), senders() and receiver_senders() are those of
  /// this plan. Linear in the size of the plan. Throws shardline::error(errc::invalid_argument)
  /// when `s` >= senders().
  transfer_plan for_sender(std::size_t s) const {
    if (s >= senders_)
      throw error(make_error_code(errc::invalid_argument),
                  "transfer_plan: sender " + std::to_string(s) + " does not exist (the plan has " +
                      std::to_string(senders_) + " senders)");
    const auto sender = static_cast<std::uint32_t>(s);
    std::vector<planned_parameter> planned;
    // Per shard of the parameter at hand: how far the sender's image moves it back.
    std::vector<std::uint64_t> shift;
    for (const auto& b : buckets_)
      for (const auto& p : b.parameters) {
        if (std::find(p.shard_senders.begin(), p.shard_senders.end(), sender) == p.shard_senders.end())
          continue;
        planned_parameter q;
        q.parameter.destination = p.parameter.destination;
        shift.assign(p.parameter.shards.size(), 0);
        for (std::size_t k = 0; k < p.parameter.shards.size(); ++k) {
          if (p.shard_senders[k] != sender) continue;
          shard_source own = p.parameter.shards[k];
          shift[k] = own.offset - q.staging_bytes;
          own.offset = q.staging_bytes;
          q.staging_bytes += own.tensor.bytes();
          q.parameter.shards.push_back(std::move(own));
        }
        q.shard_senders.assign(q.parameter.shards.size(), sender);
        const auto& shards = p.parameter.shards;
        for (const auto& w : p.writes) {
          if (w.sender != sender) continue;
          // A write's bytes lie in consecutive shards of its sender, contiguous in both images.
          // Shard i sits at position i in a full plan; a sender plan has gaps: search.
          const auto k = w.shard < shards.size() && shards[w.shard].index == w.shard
                             ? std::size_t{w.shard}
                             : static_cast<std::size_t>(
                                   std::lower_bound(shards.begin(), shards.end(), w.shard,
                                                    [](const shard_source& x, std::size_t i) { return x.index < i; }) -
                                   shards.begin());
          planned_write c = w;
          c.staging_offset -= shift[k];
          q.writes.push_back(c);
        }
        q.split = p.split;
        q.slice = p.slice;
        q.index = p.index;
        planned.push_back(std::move(q));
      }

    transfer_plan plan;
    plan.tp_ = tp_;
    plan.replicas_ = replicas_;
    plan.senders_ = senders_;
    plan.sender_ = s;
    plan.bucket_bytes_ = bucket_bytes_;
    plan.alignment_ = alignment_;
    plan.fingerprint_ = fingerprint_;
    plan.quorum_ = quorum_;
    plan.place(std::move(planned));
    return plan;
  }

  const std::vector<bucket>& buckets() const noexcept { return buckets_; }
  std::size_t tensor_parallel() const noexcept { return tp_; }
  std::size_t replicas() const noexcept { return replicas_; }
  /// tensor_parallel * replicas.
  std::size_t receivers() const noexcept { return tp_ * replicas_; }
  /// The senders of the whole transfer (plan_options::senders), in a sender plan too.
  std::size_t senders() const noexcept { return senders_; }
  /// The sender this plan belongs to (for_sender), or nullopt for a full plan.
  std::optional<std::size_t> sender() const noexcept { return sender_; }
  bool is_sender_plan() const noexcept { return sender_.has_value(); }
  /// The byte budget and alignment the plan was bucketized with.
  std::uint64_t bucket_bytes() const noexcept { return bucket_bytes_; }
  std::uint64_t staging_alignment() const noexcept { return alignment_; }
  /// The size of one staging slot: the largest bucket's staging_bytes.
  std::uint64_t max_staging_bytes() const noexcept { return max_staging_; }
  /// Sum of the parameters' staging_bytes: the full (unsliced) destination parameters' bytes
  /// in a full plan, the bytes the sender loads in a sender plan.
  std::uint64_t total_bytes() const noexcept { return total_; }

  /// A hash of everything senders and receivers must agree on: tensor_parallel, replicas,
  /// senders, and per parameter in order its name, dtype, shape, split and sliced shape, and
  /// per shard its tensor's name, dtype and shape, index, offset and sender. Not the bucketing
  /// (bucket_bytes, staging_alignment). A sender plan carries its full plan's fingerprint.
  std::uint64_t fingerprint() const noexcept { return fingerprint_; }

  /// Parameters in this plan.
  std::size_t parameter_count() const noexcept { return bucket_of_.size(); }

  /// The parameter at `position` in this plan. Throws
  /// shardline::error(errc::invalid_argument) when `position` >= parameter_count().
  const planned_parameter& parameter(std::size_t position) const {
    if (position >= parameter_count())
      throw error(make_error_code(errc::invalid_argument),
                  "transfer_plan: parameter position " + std::to_string(position) +
                      " does not exist (the plan has " + std::to_string(parameter_count()) +
                      " parameters)");
    return at(position);
  }

  /// The position in this plan of the destination parameter named `destination`, or nullopt.
  /// O(1) on average.
  std::optional<std::size_t> position(std::string_view destination) const noexcept {
    const std::size_t p = names_.find(destination, [this](std::size_t i) -> std::string_view {
      return at(i).parameter.destination.name;
    });
    if (p == detail::name_table::npos) return std::nullopt;
    return p;
  }

  /// The planned destination parameter named `destination`, or nullptr. O(1) on average.
  const planned_parameter* find(std::string_view destination) const noexcept {
    const auto p = position(destination);
    return p ? &at(*p) : nullptr;
  }

  /// The senders that write at least one byte to receiver `receiver`, sorted: the senders
  /// whose commits the receiver waits for. A property of the whole transfer: a sender plan
  /// answers as its full plan. Throws shardline::error(errc::invalid_argument) when
  /// `receiver` >= receivers().
  const std::vector<std::uint32_t>& receiver_senders(std::size_t receiver) const {
    check_receiver(receiver);
    static const std::vector<std::uint32_t> none;
    return receiver < quorum_.size() ? quorum_[receiver] : none;
  }

  /// What receiver `receiver` must expose for this plan, in plan order: every destination
  /// parameter of this plan (in a sender plan: those the sender holds a part of) with its
  /// sliced shape, named as the destination. Throws shardline::error(errc::invalid_argument)
  /// when `receiver` >= receivers().
  std::vector<parameter_descriptor> receiver_parameters(std::size_t receiver) const {
    check_receiver(receiver);
    std::vector<parameter_descriptor> out;
    out.reserve(parameter_count());
    for (const auto& b : buckets_)
      for (const auto& p : b.parameters) out.push_back(p.slice);
    return out;
  }

  /// Checks what receiver `receiver` exposes (name and bytes() of each parameter; extra
  /// parameters are allowed) against this plan's parameters. Throws shardline::error naming
  /// the parameter, the receiver and both sizes: errc::unknown_parameter when a planned
  /// parameter is not exposed, errc::size_mismatch when the byte counts differ;
  /// errc::invalid_argument when `receiver` >= receivers().
  void validate_receiver(std::size_t receiver, std::span<const parameter_descriptor> exposed) const {
    check_receiver(receiver);
    const auto name_of = [exposed](std::size_t i) -> std::string_view { return exposed[i].name; };
    detail::name_table names(exposed.size());  // a name exposed twice: the first counts
    for (std::size_t i = 0; i < exposed.size(); ++i) names.insert(exposed[i].name, i, name_of);
    for (const auto& b : buckets_)
      for (const auto& p : b.parameters) {
        const std::string& name = p.slice.name;
        const std::size_t i = names.find(name, name_of);
        if (i == detail::name_table::npos)
          throw error(make_error_code(errc::unknown_parameter),
                      "parameter '" + name + "': receiver " + std::to_string(receiver) +
                          " does not expose it (the plan sends it " + std::to_string(p.slice.bytes()) +
                          " bytes, the receiver has 0)");
        if (exposed[i].bytes() != p.slice.bytes())
          throw error(make_error_code(errc::size_mismatch),
                      "parameter '" + name + "': receiver " + std::to_string(receiver) +
                          " exposes " + std::to_string(exposed[i].bytes()) + " bytes, the plan sends " +
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
  // Which sender holds each source tensor, from plan_options.sender_of or sender_tensors,
  // checked once for the whole model.
  class sender_table {
  public:
    sender_table(std::span<const parameter_descriptor> sources, const plan_options& o)
        : options_(o) {
      if (o.sender_tensors.empty()) return;
      const auto fail = [](errc code, const std::string& why) {
        return error(make_error_code(code), "transfer_plan: " + why);
      };
      std::size_t names = 0;
      for (const auto& list : o.sender_tensors) names += list.size();
      claims_.reserve(names);
      table_.reserve(names);
      for (std::size_t s = 0; s < o.sender_tensors.size(); ++s)
        for (const auto& name : o.sender_tensors[s]) {
          const std::size_t c = table_.insert(name, claims_.size(), claim_name{claims_});
          if (c == detail::name_table::npos) {
            claims_.push_back({&name, static_cast<std::uint32_t>(s), false});
            continue;
          }
          if (claims_[c].sender == s)
            throw fail(errc::invalid_argument, "source tensor '" + name + "' is listed twice by sender " +
                                                   std::to_string(s));
          throw fail(errc::invalid_argument, "source tensor '" + name + "' is claimed by senders " +
                                                 std::to_string(claims_[c].sender) + " and " +
                                                 std::to_string(s));
        }
      for (const auto& source : sources) {
        const std::size_t c = table_.find(source.name, claim_name{claims_});
        if (c == detail::name_table::npos)
          throw fail(errc::invalid_argument, "source tensor '" + source.name +
                                                 "' is held by no sender (plan_options.sender_tensors "
                                                 "lists it for none of the " +
                                                 std::to_string(o.senders) + " senders)");
        claims_[c].held = true;
      }
      // Sources are unique (shard_map::fuse checked), so all are held when the counts agree.
      if (claims_.size() == sources.size()) return;
      for (const auto& c : claims_)
        if (!c.held)
          throw fail(errc::unknown_parameter, "plan_options.sender_tensors[" + std::to_string(c.sender) +
                                                  "] names '" + *c.name + "', which is no source tensor");
    }

    std::uint32_t operator()(const parameter_descriptor& source) const {
      if (!claims_.empty()) return claims_[table_.find(source.name, claim_name{claims_})].sender;
      if (!options_.sender_of) return 0;
      const std::size_t s = options_.sender_of(source);
      if (s >= options_.senders)
        throw error(make_error_code(errc::invalid_argument),
                    "transfer_plan: source tensor '" + source.name + "': sender_of gave sender " +
                        std::to_string(s) + ", the plan has " + std::to_string(options_.senders) +
                        " senders");
      return static_cast<std::uint32_t>(s);
    }

  private:
    struct claim {
      const std::string* name;  // in options_.sender_tensors
      std::uint32_t sender;
      bool held;
    };
    struct claim_name {
      const std::vector<claim>& claims;
      std::string_view operator()(std::size_t c) const { return *claims[c].name; }
    };
    const plan_options& options_;
    std::vector<claim> claims_;  // in sender_tensors order
    detail::name_table table_;   // name -> claim
  };

  const planned_parameter& at(std::size_t position) const noexcept {
    const bucket& b = buckets_[bucket_of_[position]];
    return b.parameters[position - b.first];
  }

  void check_receiver(std::size_t receiver) const {
    if (receiver >= receivers())
      throw error(make_error_code(errc::invalid_argument),
                  "transfer_plan: receiver " + std::to_string(receiver) + " does not exist (the plan has " +
                      std::to_string(receivers()) + " receivers)");
  }

  // Bucketizes `planned` in order by bucket_bytes_ and alignment_, then indexes it: position
  // -> bucket, and positions by name.
  void place(std::vector<planned_parameter> planned) {
    const std::uint64_t align = alignment_;
    bucket current;
    const auto close = [this, &current] {
      if (current.parameters.empty()) return;
      max_staging_ = std::max(max_staging_, current.staging_bytes);
      const std::size_t next = current.first + current.parameters.size();
      buckets_.push_back(std::move(current));
      current = {};
      current.first = next;
    };
    for (auto& p : planned) {
      const std::uint64_t bytes = p.staging_bytes;
      total_ += bytes;
      std::uint64_t at = (current.staging_bytes + align - 1) & ~(align - 1);
      if (!current.parameters.empty() && (at + bytes > bucket_bytes_ || at < current.staging_bytes)) {
        close();
        at = 0;
      }
      p.staging_offset = at;
      current.staging_bytes = at + bytes;
      current.parameters.push_back(std::move(p));
      // A parameter at or past the budget fills its bucket by itself.
      if (current.staging_bytes >= bucket_bytes_) close();
    }
    close();

    bucket_of_.resize(planned.size());
    for (std::size_t b = 0; b < buckets_.size(); ++b)
      std::fill_n(bucket_of_.begin() + static_cast<std::ptrdiff_t>(buckets_[b].first),
                  buckets_[b].parameters.size(), static_cast<std::uint32_t>(b));
    names_.reserve(planned.size());
    const auto name_of = [this](std::size_t i) -> std::string_view {
      return at(i).parameter.destination.name;
    };
    // Destination names are unique: shard_map::fuse groups by name.
    for (std::size_t pos = 0; pos < planned.size(); ++pos) names_.insert(name_of(pos), pos, name_of);
  }

  static detail::fnv1a encode_header(std::size_t tp, std::size_t replicas, std::size_t senders,
                                     std::size_t parameters) {
    detail::fnv1a h;
    h.str("shardline.transfer_plan.1");
    h.u64(tp);
    h.u64(replicas);
    h.u64(senders);
    h.u64(parameters);
    return h;
  }

  static std::uint64_t fingerprint_of(const transfer_plan& plan, const std::vector<planned_parameter>& planned) {
    detail::fnv1a h = encode_header(plan.tp_, plan.replicas_, plan.senders_, planned.size());
    for (const auto& p : planned) {
      const parameter_descriptor& d = p.parameter.destination;
      h.str(d.name);
      h.u64(static_cast<std::uint64_t>(d.type));
      h.shape(d.shape);
      h.u64(static_cast<std::uint64_t>(p.split));
      h.shape(p.slice.shape);
      h.u64(p.parameter.shards.size());
      for (std::size_t k = 0; k < p.parameter.shards.size(); ++k) {
        const shard_source& s = p.parameter.shards[k];
        h.str(s.tensor.name);
        h.u64(static_cast<std::uint64_t>(s.tensor.type));
        h.shape(s.tensor.shape);
        h.u64(s.index);
        h.u64(s.offset);
        h.u64(p.shard_senders[k]);
      }
    }
    return h.value();
  }

  // The writes of one rank, then repeated for every replica.
  static planned_parameter slice(fused_parameter f, std::vector<std::uint32_t> shard_senders,
                                 const plan_options& options) {
    const std::size_t tp = options.tensor_parallel;
    planned_parameter p;
    p.parameter = std::move(f);
    const parameter_descriptor& d = p.parameter.destination;
    const std::vector<shard_source>& shards = p.parameter.shards;
    p.split = tp == 1 ? tp_split::replicate : options.split ? options.split(d) : default_split(d);
    p.slice = d;
    p.staging_bytes = d.bytes();
    p.shard_senders = std::move(shard_senders);
    const auto fail = [&d](const std::string& why) {
      return error(make_error_code(errc::invalid_argument),
                   "transfer_plan: parameter '" + d.name + "': " + why);
    };
    const auto by_tp = [tp] { return "tensor_parallel " + std::to_string(tp); };
    const std::uint64_t elem = size_of(d.type);
    switch (p.split) {
      case tp_split::replicate:
        break;
      case tp_split::rows: {
        // Each shard's dim 0 sits at dim (destination rank - shard rank) of the destination.
        std::size_t dim = 0;
        for (const auto& s : shards) {
          if (s.tensor.shape.empty())
            throw fail("shard " + std::to_string(s.index) + " ('" + s.tensor.name +
                       "') is a scalar and cannot be split by rows for " + by_tp());
          const auto rows = static_cast<std::uint64_t>(s.tensor.shape[0]);
          if (rows % tp != 0)
            throw fail("shard " + std::to_string(s.index) + " ('" + s.tensor.name + "') has " +
                       std::to_string(rows) + " rows (dim 0), not divisible by " + by_tp());
          dim = d.shape.size() - s.tensor.shape.size();
        }
        if (!shards.empty()) p.slice.shape[dim] /= static_cast<std::int64_t>(tp);
        break;
      }
      case tp_split::columns: {
        if (d.shape.empty()) throw fail("a scalar cannot be split by columns for " + by_tp());
        const auto cols = static_cast<std::uint64_t>(d.shape.back());
        if (cols % tp != 0)
          throw fail("its last dim " + std::to_string(cols) + " (shape " + shape_string(d.shape) +
                     ") is not divisible by " + by_tp());
        p.slice.shape.back() /= static_cast<std::int64_t>(tp);
        break;
      }
      default:
        throw fail("the split function returned an unknown tp_split (" +
                   std::to_string(static_cast<int>(p.split)) + ")");
    }

    // A sender change adds writes; this is the count without any.
    const std::size_t receivers = tp * options.replicas;
    if (p.split == tp_split::replicate) p.writes.reserve(receivers);
    if (p.split == tp_split::rows) p.writes.reserve(receivers * shards.size());
    // Columns: one write per row of the whole parameter.
    const auto cols = p.split == tp_split::columns ? static_cast<std::uint64_t>(d.shape.back()) : 0;
    const std::uint64_t rows = cols == 0 ? 0 : d.elements() / cols;
    const std::uint64_t row_bytes = cols * elem, mine = row_bytes / tp;
    if (p.split == tp_split::columns) p.writes.reserve(receivers * rows);
    for (std::size_t replica = 0; replica < options.replicas; ++replica)
      for (std::size_t r = 0; r < tp; ++r) {
        const std::size_t receiver = replica * tp + r;
        shard_cursor shard(p);
        if (p.split == tp_split::replicate) {
          emit(p, shard, receiver, 0, 0, p.staging_bytes);
        } else if (p.split == tp_split::rows) {
          std::uint64_t cursor = 0;
          for (const auto& s : shards) {
            const std::uint64_t chunk = s.tensor.bytes() / tp;
            emit(p, shard, receiver, s.offset + r * chunk, cursor, chunk);
            cursor += chunk;
          }
        } else {
          for (std::uint64_t i = 0; i < rows; ++i)
            emit(p, shard, receiver, i * row_bytes + r * mine, i * mine, mine);
        }
      }
    return p;
  }

  // A shard of a parameter and where it ends in the staging image.
  struct shard_cursor {
    explicit shard_cursor(const planned_parameter& p) : end(end_of(p, 0)) {}
    static std::uint64_t end_of(const planned_parameter& p, std::size_t k) {
      return p.parameter.shards[k].offset + p.parameter.shards[k].tensor.bytes();
    }
    std::size_t shard = 0;
    std::uint64_t end;
  };

  // Appends staging bytes [from, from + bytes) of `p` going to `to` on `receiver`: split where
  // the owning sender changes from one shard to the next, so every write has one sender.
  // `at` starts at or before the shard holding `from` and is left at the one holding the last
  // byte: each receiver's bytes come in increasing staging order, so it only moves forward.
  static void emit(planned_parameter& p, shard_cursor& at, std::size_t receiver, std::uint64_t from,
                   std::uint64_t to, std::uint64_t bytes) {
    if (bytes == 0) return;
    const auto next = [&p, &at] { at.end = shard_cursor::end_of(p, ++at.shard); };
    while (at.end <= from) next();
    for (;;) {
      const std::uint64_t n = std::min(bytes, at.end - from);
      push(p.writes, {receiver, from, to, n, p.shard_senders[at.shard],
                      static_cast<std::uint32_t>(p.parameter.shards[at.shard].index)});
      from += n;
      to += n;
      bytes -= n;
      if (bytes == 0) return;
      next();
    }
  }

  // Appends `w`, merged into the previous write when both sides continue it and the sender is
  // the same.
  static void push(std::vector<planned_write>& writes, planned_write w) {
    if (w.bytes == 0) return;
    if (!writes.empty()) {
      planned_write& last = writes.back();
      if (last.receiver == w.receiver && last.sender == w.sender &&
          last.staging_offset + last.bytes == w.staging_offset &&
          last.destination_offset + last.bytes == w.destination_offset) {
        last.bytes += w.bytes;
        return;
      }
    }
    writes.push_back(w);
  }

  std::vector<bucket> buckets_;
  std::vector<std::uint32_t> bucket_of_;            // position -> bucket
  detail::name_table names_;                        // destination name -> position
  std::vector<std::vector<std::uint32_t>> quorum_;  // receiver -> sorted senders writing to it
  std::size_t tp_ = 1;
  std::size_t replicas_ = 1;
  std::size_t senders_ = 1;
  std::optional<std::size_t> sender_;
  std::uint64_t bucket_bytes_ = 64ull << 20;
  std::uint64_t alignment_ = 256;
  std::uint64_t max_staging_ = 0;
  std::uint64_t total_ = 0;
  std::uint64_t fingerprint_ = 0;
};

}  // namespace shardline
