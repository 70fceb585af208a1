// shardline/shard_map.hpp: rules that fuse a trainer's source tensors into the destination
// parameters of the inference layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj, MoE
// experts -> w13/w2, and user rules).
#pragma once

#include <shardline/error.hpp>
#include <shardline/parameter.hpp>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <regex>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace shardline {

/// One source tensor of the trainer feeding one destination parameter.
struct shard_source {
  parameter_descriptor tensor;  ///< the source tensor, in the destination dtype
  std::size_t index = 0;        ///< shard index inside the destination parameter's barrier
  std::uint64_t offset = 0;     ///< byte offset inside the (full, unsliced) destination parameter
  std::string label;            ///< short name for messages ("k_proj", "expert 3 up_proj");
                                ///< empty: the tensor's name
};

/// A destination parameter in the inference layout, with its shards: sorted by index, their
/// byte ranges [offset, offset + tensor.bytes()) tile [0, destination.bytes()) exactly, in
/// index order.
struct fused_parameter {
  parameter_descriptor destination;
  std::vector<shard_source> shards;

  /// Short names of the shards in index order, for messages ("q_proj", "expert 3 up_proj").
  std::vector<std::string> shard_names() const {
    std::vector<std::string> names;
    names.reserve(shards.size());
    for (const auto& s : shards) names.push_back(s.label.empty() ? s.tensor.name : s.label);
    return names;
  }
};

/// A rule fusing several source tensors into one destination parameter.
///
/// `pattern` is an ECMAScript regular expression that must match a source name as a whole.
/// Capture group `member_group` holds the member's name, which must be one of `members`
/// (otherwise the rule does not apply); the position in `members` is the member's order in
/// the fused layout. `destination` is the fused parameter's name, a format string over the
/// pattern's groups ($1, $2, ...; $$ for a dollar), so every source that yields the same
/// destination name belongs to the same fused parameter.
///
/// Layout. Without experts, members are concatenated on dim 0, in `members` order: members
/// [a_i, T...] give [sum a_i, T...]. With `expert_group` (a group holding a decimal expert
/// index), every expert's members are concatenated the same way and the experts stacked on a
/// new dim 0: [E, sum a_i, T...], expert e's member m at shard e * members.size() + m. Every
/// member (of every expert) must be present exactly once, experts numbered 0..E-1, all with
/// one dtype and the same T...; experts must agree in shape.
class fusion_rule {
public:
  /// What a rule makes of one source name.
  struct match_result {
    std::string destination;            ///< the fused parameter's name
    std::size_t member = 0;             ///< position in members()
    std::optional<std::size_t> expert;  ///< the expert index, for expert rules
  };

  /// Throws shardline::error(errc::invalid_argument) naming the pattern when it does not
  /// compile, a group index is 0 or past the pattern's groups, the two groups coincide, or
  /// `members` is empty or names a member twice.
  fusion_rule(std::string pattern, std::string destination, std::size_t member_group,
              std::vector<std::string> members, std::size_t expert_group = 0)
      : pattern_(std::move(pattern)),
        destination_(std::move(destination)),
        members_(std::move(members)),
        member_group_(member_group),
        expert_group_(expert_group) {
    const auto bad = [this](const std::string& why) {
      return error(make_error_code(errc::invalid_argument),
                   "fusion_rule '" + pattern_ + "': " + why);
    };
    try {
      regex_.assign(pattern_, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw bad(std::string("the pattern does not compile: ") + e.what());
    }
    const std::size_t groups = regex_.mark_count();
    if (member_group_ == 0 || member_group_ > groups)
      throw bad("member_group " + std::to_string(member_group_) +
                " is not a capture group of the pattern (it has " + std::to_string(groups) + ")");
    if (expert_group_ > groups)
      throw bad("expert_group " + std::to_string(expert_group_) +
                " is not a capture group of the pattern (it has " + std::to_string(groups) + ")");
    if (expert_group_ == member_group_)
      throw bad("expert_group and member_group are both group " + std::to_string(member_group_));
    if (members_.empty()) throw bad("no members");
    for (std::size_t i = 0; i < members_.size(); ++i)
      for (std::size_t j = 0; j < i; ++j)
        if (members_[i] == members_[j]) throw bad("member '" + members_[i] + "' listed twice");
  }

  /// <p>.<member>.<s> -> <p>.<fused>.<s>, members concatenated on dim 0 in the given order.
  /// Example: concat({"q_proj", "k_proj", "v_proj"}, "qkv_proj").
  static fusion_rule concat(const std::vector<std::string>& members, const std::string& fused) {
    return {"^(.+)\\.(" + alternatives(members) + ")\\.(.+)$", "$1." + format_literal(fused) + ".$3",
            2, members};
  }

  /// <p>.experts.<N>.<member>.<suffix> -> <p>.experts.<fused>, experts stacked on a new dim 0.
  /// Example: experts({"gate_proj", "up_proj"}, "w13_weight") gives [E, 2I, H].
  static fusion_rule experts(const std::vector<std::string>& members, const std::string& fused,
                             const std::string& suffix = "weight") {
    return {"^(.+)\\.experts\\.([0-9]+)\\.(" + alternatives(members) + ")\\." +
                regex_literal(suffix) + "$",
            "$1.experts." + format_literal(fused), 3, members, 2};
  }

  const std::string& pattern() const noexcept { return pattern_; }
  const std::string& destination() const noexcept { return destination_; }
  const std::vector<std::string>& members() const noexcept { return members_; }
  bool stacks_experts() const noexcept { return expert_group_ != 0; }

  /// The fused name, member and expert of `source`, or nullopt when the rule does not apply.
  /// Throws shardline::error(errc::invalid_argument) naming the source when its expert index
  /// does not fit a std::size_t.
  std::optional<match_result> match(const std::string& source) const {
    std::smatch m;
    if (!std::regex_match(source, m, regex_)) return std::nullopt;
    if (!m[member_group_].matched) return std::nullopt;
    const auto it = std::find(members_.begin(), members_.end(), m[member_group_].str());
    if (it == members_.end()) return std::nullopt;
    match_result r{m.format(destination_), static_cast<std::size_t>(it - members_.begin()), {}};
    if (expert_group_ != 0) {
      if (!m[expert_group_].matched) return std::nullopt;
      const std::string digits = m[expert_group_].str();
      std::size_t e = 0;
      const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), e);
      if (ec != std::errc{} || end != digits.data() + digits.size())
        throw error(make_error_code(errc::invalid_argument),
                    "shard_map: source tensor '" + source + "': expert index '" + digits +
                        "' is not a decimal index (rule '" + pattern_ + "')");
      r.expert = e;
    }
    return r;
  }

private:
  static std::string regex_literal(const std::string& s) {
    std::string out;
    for (char c : s) {
      if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out += '\\';
      out += c;
    }
    return out;
  }
  static std::string format_literal(const std::string& s) {
    std::string out;
    for (char c : s) {
      if (c == '$') out += '$';
      out += c;
    }
    return out;
  }
  static std::string alternatives(const std::vector<std::string>& members) {
    std::string out;
    for (const auto& m : members) out += (out.empty() ? "" : "|") + regex_literal(m);
    return out;
  }

  std::string pattern_;
  std::string destination_;
  std::vector<std::string> members_;
  std::size_t member_group_;
  std::size_t expert_group_;
  std::regex regex_;
};

/// Rules that fuse source tensors into destination parameters. Rules are tried in the order
/// they were added; the first that applies wins; a source no rule applies to maps 1:1 (one
/// shard, same name). A default-constructed map is the identity.
class shard_map {
public:
  /// The vLLM layouts: MoE <p>.experts.<N>.gate_proj/up_proj.weight -> <p>.experts.w13_weight
  /// [E, 2I, H] (expert e: gate at shard 2e, up at 2e+1) and <p>.experts.<N>.down_proj.weight
  /// -> <p>.experts.w2_weight [E, H, I]; then <p>.q_proj/k_proj/v_proj.<s> -> <p>.qkv_proj.<s>
  /// and <p>.gate_proj/up_proj.<s> -> <p>.gate_up_proj.<s> (dim 0 concatenation). The expert
  /// rules come first so that expert gate/up projections are not fused per expert.
  static shard_map standard() {
    shard_map m;
    m.add(fusion_rule::experts({"gate_proj", "up_proj"}, "w13_weight"));
    m.add(fusion_rule::experts({"down_proj"}, "w2_weight"));
    m.add(fusion_rule::concat({"q_proj", "k_proj", "v_proj"}, "qkv_proj"));
    m.add(fusion_rule::concat({"gate_proj", "up_proj"}, "gate_up_proj"));
    return m;
  }

  /// No fusion: every source is its own destination parameter.
  static shard_map identity() { return {}; }

  /// Appends a rule, tried after the ones already there.
  shard_map& add(fusion_rule rule) {
    rules_.push_back(std::move(rule));
    return *this;
  }

  const std::vector<fusion_rule>& rules() const noexcept { return rules_; }

  /// Groups `sources` into destination parameters, in first-appearance order of each
  /// destination. Throws shardline::error naming the tensors:
  /// errc::invalid_argument for an empty name, a negative dimension, an unknown dtype, a byte
  /// count past 64 bits, the same source name twice, members of one fused parameter with
  /// different dtypes, a member that is a scalar, a member given twice, a member missing,
  /// expert indices that are not 0..E-1, and one destination name produced by two rules;
  /// errc::size_mismatch for members whose dims past dim 0 differ, or experts whose shapes differ.
  std::vector<fused_parameter> fuse(std::span<const parameter_descriptor> sources) const {
    constexpr std::size_t no_rule = std::numeric_limits<std::size_t>::max();
    struct member_entry {
      std::size_t expert = 0, member = 0, source = 0;
    };
    struct group {
      std::string destination;
      std::size_t rule = no_rule;
      std::vector<member_entry> entries;
    };
    std::vector<group> groups;
    std::unordered_map<std::string, std::size_t> by_destination;
    std::unordered_set<std::string_view> seen;

    for (std::size_t i = 0; i < sources.size(); ++i) {
      const parameter_descriptor& s = sources[i];
      validate_source(s);
      if (!seen.insert(s.name).second)
        throw error(make_error_code(errc::invalid_argument),
                    "shard_map: source tensor '" + s.name + "' given twice");
      std::size_t rule = no_rule;
      fusion_rule::match_result m{s.name, 0, {}};
      for (std::size_t r = 0; r < rules_.size() && rule == no_rule; ++r)
        if (auto found = rules_[r].match(s.name)) {
          rule = r;
          m = std::move(*found);
        }
      auto [it, inserted] = by_destination.try_emplace(m.destination, groups.size());
      if (inserted) {
        groups.push_back({m.destination, rule, {}});
      } else if (groups[it->second].rule != rule) {
        const group& g = groups[it->second];
        throw error(make_error_code(errc::invalid_argument),
                    "shard_map: destination '" + m.destination + "' is produced from '" +
                        sources[g.entries.front().source].name + "' by " + rule_name(g.rule) +
                        " and from '" + s.name + "' by " + rule_name(rule));
      }
      groups[it->second].entries.push_back({m.expert.value_or(0), m.member, i});
    }

    std::vector<fused_parameter> fused;
    fused.reserve(groups.size());
    for (auto& g : groups) {
      if (g.rule == no_rule) {
        const parameter_descriptor& s = sources[g.entries.front().source];
        fused.push_back({s, {{s, 0, 0, s.name}}});
      } else {
        fused.push_back(fuse_group(rules_[g.rule], g.destination, g.entries, sources));
      }
    }
    return fused;
  }

private:
  template <class Entry>
  static fused_parameter fuse_group(const fusion_rule& rule, const std::string& name,
                                    std::vector<Entry>& entries,
                                    std::span<const parameter_descriptor> sources) {
    const auto fail = [&name](errc code, const std::string& why) {
      return error(make_error_code(code), "shard_map: fused parameter '" + name + "': " + why);
    };
    const auto& members = rule.members();
    const auto src = [&sources](const Entry& e) -> const parameter_descriptor& {
      return sources[e.source];
    };
    const auto label = [&rule, &members](const Entry& e) {
      return rule.stacks_experts() ? "expert " + std::to_string(e.expert) + " " + members[e.member]
                                   : members[e.member];
    };

    const parameter_descriptor& first = src(entries.front());
    for (const auto& e : entries) {
      const parameter_descriptor& s = src(e);
      if (s.shape.empty())
        throw fail(errc::invalid_argument,
                   "member " + describe(s) + " is a scalar; members are concatenated on dim 0");
      if (s.type != first.type)
        throw fail(errc::invalid_argument, "member " + describe(s) + " and member " +
                                               describe(first) +
                                               " differ in dtype; members share one dtype");
      if (!std::equal(s.shape.begin() + 1, s.shape.end(), first.shape.begin() + 1,
                      first.shape.end()))
        throw fail(errc::size_mismatch,
                   "member " + describe(s) + " and member " + describe(first) +
                       " differ past dim 0; members are concatenated on dim 0");
    }

    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
      return a.expert != b.expert ? a.expert < b.expert : a.member < b.member;
    });
    for (std::size_t i = 1; i < entries.size(); ++i)
      if (entries[i].expert == entries[i - 1].expert && entries[i].member == entries[i - 1].member)
        throw fail(errc::invalid_argument, label(entries[i]) + " given twice: '" +
                                               src(entries[i - 1]).name + "' and '" +
                                               src(entries[i]).name + "'");

    // Sorted and without duplicates, a complete set is exactly (i / M, i % M) at position i.
    const std::size_t m_count = members.size();
    std::size_t expected_expert = 0;
    for (const auto& e : entries) {
      if (e.expert > expected_expert)
        throw fail(errc::invalid_argument,
                   "expert indices must run 0..E-1 without gaps, expert " +
                       std::to_string(expected_expert) + " is missing (next is expert " +
                       std::to_string(e.expert) + ", '" + src(e).name + "')");
      expected_expert = e.expert + 1;
    }
    const std::size_t e_count = expected_expert;
    for (std::size_t i = 0; i < e_count * m_count; ++i) {
      const bool present = i < entries.size() && entries[i].expert == i / m_count &&
                           entries[i].member == i % m_count;
      if (!present) {
        const Entry missing{i / m_count, i % m_count, 0};
        throw fail(errc::invalid_argument,
                   label(missing) + " is missing; the rule '" + rule.pattern() + "' needs every member");
      }
    }

    std::int64_t unit_rows = 0;
    for (std::size_t m = 0; m < m_count; ++m) unit_rows += src(entries[m]).shape[0];
    for (std::size_t i = m_count; i < entries.size(); ++i) {
      const parameter_descriptor& s = src(entries[i]);
      const parameter_descriptor& ref = src(entries[i % m_count]);
      if (s.shape != ref.shape)
        throw fail(errc::size_mismatch, label(entries[i]) + " " + describe(s) + " and " +
                                            label(entries[i % m_count]) + " " + describe(ref) +
                                            " differ; every expert has the same shape");
    }

    fused_parameter f;
    f.destination.name = name;
    f.destination.type = first.type;
    if (rule.stacks_experts()) f.destination.shape.push_back(static_cast<std::int64_t>(e_count));
    f.destination.shape.push_back(unit_rows);
    f.destination.shape.insert(f.destination.shape.end(), first.shape.begin() + 1, first.shape.end());
    std::uint64_t offset = 0;
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const parameter_descriptor& s = src(entries[i]);
      f.shards.push_back({s, i, offset, label(entries[i])});
      offset += s.bytes();
    }
    return f;
  }

  static void validate_source(const parameter_descriptor& s) {
    const auto fail = [&s](const std::string& why) {
      return error(make_error_code(errc::invalid_argument),
                   "shard_map: source tensor '" + s.name + "': " + why);
    };
    if (s.name.empty()) throw fail("the name is empty");
    if (size_of(s.type) == 0)
      throw fail("unknown dtype (value " + std::to_string(static_cast<int>(s.type)) + ")");
    std::uint64_t bytes = size_of(s.type);
    for (std::int64_t d : s.shape) {
      if (d < 0) throw fail("negative dimension in shape " + shape_string(s.shape));
      if (__builtin_mul_overflow(bytes, static_cast<std::uint64_t>(d), &bytes))
        throw fail("shape " + shape_string(s.shape) + " has more than 2^64 bytes");
    }
  }

  std::string rule_name(std::size_t r) const {
    return r < rules_.size() ? "rule '" + rules_[r].pattern() + "'" : std::string("no rule (1:1)");
  }

  std::vector<fusion_rule> rules_;
};

}  // namespace shardline
