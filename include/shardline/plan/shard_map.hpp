// shardline/plan/shard_map.hpp: rules that fuse a trainer's source tensors into the destination
// parameters of the inference layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj, MoE
// experts -> w13/w2, and user rules).
#pragma once

#include <shardline/error.hpp>
#include <shardline/plan/parameter.hpp>

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

namespace detail {
// A flat open-addressing table of names for 10^5-entry models: node-based hash tables pay
// several cache misses per insert there. It stores ids chosen by the caller (indices into the
// caller's arrays) with a hash fragment; `name_of(id)` gives an id's name, and is called only
// when the fragments agree. Holding no pointers, it stays valid when its owner is copied.
class name_table {
public:
  static constexpr std::size_t npos = std::numeric_limits<std::size_t>::max();

  name_table() = default;
  explicit name_table(std::size_t names) { reserve(names); }

  // Empties the table and makes room for `names` names without growing.
  void reserve(std::size_t names) {
    std::size_t size = 8;
    while (size < 2 * names) size *= 2;
    slots_.assign(size, slot{});
    count_ = 0;
  }

  // The id stored under `name`, or npos.
  template <class NameOf>
  std::size_t find(std::string_view name, const NameOf& name_of) const {
    if (slots_.empty()) return npos;
    const std::size_t h = std::hash<std::string_view>{}(name), mask = slots_.size() - 1;
    for (std::size_t i = h & mask; slots_[i].id != 0; i = (i + 1) & mask)
      if (slots_[i].hash == fragment(h) && name_of(slots_[i].id - 1) == name) return slots_[i].id - 1;
    return npos;
  }

  // The id already stored under `name`, or npos after storing `id` (below 2^32 - 1) under it.
  template <class NameOf>
  std::size_t insert(std::string_view name, std::size_t id, const NameOf& name_of) {
    if (2 * (count_ + 1) > slots_.size()) grow(name_of);
    const std::size_t h = std::hash<std::string_view>{}(name), mask = slots_.size() - 1;
    std::size_t i = h & mask;
    for (; slots_[i].id != 0; i = (i + 1) & mask)
      if (slots_[i].hash == fragment(h) && name_of(slots_[i].id - 1) == name) return slots_[i].id - 1;
    slots_[i] = {fragment(h), static_cast<std::uint32_t>(id + 1)};
    ++count_;
    return npos;
  }

private:
  struct slot {
    std::uint32_t hash = 0;
    std::uint32_t id = 0;  // id + 1; 0: empty
  };
  // The high half: the low bits pick the slot already.
  static std::uint32_t fragment(std::size_t h) noexcept {
    return static_cast<std::uint32_t>(static_cast<std::uint64_t>(h) >> 32);
  }
  template <class NameOf>
  void grow(const NameOf& name_of) {
    std::vector<slot> old = std::move(slots_);
    slots_.assign(std::max<std::size_t>(8, 2 * old.size()), slot{});
    const std::size_t mask = slots_.size() - 1;
    for (const slot& s : old) {
      if (s.id == 0) continue;
      std::size_t i = std::hash<std::string_view>{}(name_of(s.id - 1)) & mask;
      while (slots_[i].id != 0) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }
  std::vector<slot> slots_;
  std::size_t count_ = 0;
};
}  // namespace detail

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
///
/// Cost. std::regex takes microseconds per name, which adds up to seconds at 10^5 tensors:
/// rules from concat() and experts() are matched by hand instead, with exactly the result of
/// their pattern. A rule built from a pattern is tried only on names that contain one of its
/// members.
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
    fusion_rule r{"^(.+)\\.(" + alternatives(members) + ")\\.(.+)$",
                  "$1." + format_literal(fused) + ".$3", 2, members};
    r.form_ = form::concat;
    r.fused_ = fused;
    return r;
  }

  /// <p>.experts.<N>.<member>.<suffix> -> <p>.experts.<fused>, experts stacked on a new dim 0.
  /// Example: experts({"gate_proj", "up_proj"}, "w13_weight") gives [E, 2I, H].
  static fusion_rule experts(const std::vector<std::string>& members, const std::string& fused,
                             const std::string& suffix = "weight") {
    fusion_rule r{"^(.+)\\.experts\\.([0-9]+)\\.(" + alternatives(members) + ")\\." +
                      regex_literal(suffix) + "$",
                  "$1.experts." + format_literal(fused), 3, members, 2};
    r.form_ = form::experts;
    r.fused_ = fused;
    r.suffix_ = suffix;
    return r;
  }

  const std::string& pattern() const noexcept { return pattern_; }
  const std::string& destination() const noexcept { return destination_; }
  const std::vector<std::string>& members() const noexcept { return members_; }
  bool stacks_experts() const noexcept { return expert_group_ != 0; }

  /// The fused name, member and expert of `source`, or nullopt when the rule does not apply.
  /// Throws shardline::error(errc::invalid_argument) naming the source when its expert index
  /// does not fit a std::size_t.
  std::optional<match_result> match(const std::string& source) const {
    // std::regex costs microseconds per name and models have 100k tensors: the factory
    // patterns have a fixed shape and are matched by hand, with the regex's exact semantics.
    if (form_ == form::concat) return match_concat(source);
    if (form_ == form::experts) return match_experts(source);
    // The member group must equal a member, so a name that contains none cannot match.
    if (std::none_of(members_.begin(), members_.end(), [&source](const std::string& m) {
          return source.find(m) != std::string::npos;
        }))
      return std::nullopt;
    std::smatch m;
    if (!std::regex_match(source, m, regex_)) return std::nullopt;
    if (!m[member_group_].matched) return std::nullopt;
    const auto it = std::find(members_.begin(), members_.end(), m[member_group_].str());
    if (it == members_.end()) return std::nullopt;
    match_result r{m.format(destination_), static_cast<std::size_t>(it - members_.begin()), {}};
    if (expert_group_ != 0) {
      if (!m[expert_group_].matched) return std::nullopt;
      r.expert = expert_index(source, m[expert_group_].str());
    }
    return r;
  }

private:
  enum class form : std::uint8_t { pattern, concat, experts };

  std::size_t expert_index(const std::string& source, std::string_view digits) const {
    std::size_t e = 0;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), e);
    if (ec != std::errc{} || end != digits.data() + digits.size())
      throw error(make_error_code(errc::invalid_argument),
                  "shard_map: source tensor '" + source + "': expert index '" + std::string(digits) +
                      "' is not a decimal index (rule '" + pattern_ + "')");
    return e;
  }

  // ECMAScript's '.' matches anything but a line terminator ('\n', '\r' for char).
  static bool any_line_terminator(std::string_view s) noexcept {
    return std::any_of(s.begin(), s.end(), [](char c) { return c == '\n' || c == '\r'; });
  }

  // ^(.+)\.(m0|m1|...)\.(.+)$ -> $1.<fused>.$3. Backtracking order: the greedy $1 tries the
  // longest prefix first (the last dot first), then the members in order; $1 and $3 must be
  // non-empty and free of line terminators.
  std::optional<match_result> match_concat(const std::string& s) const {
    const std::string_view v = s;
    for (std::size_t dot = v.rfind('.'); dot != std::string::npos && dot >= 1;
         dot = v.rfind('.', dot - 1)) {
      for (std::size_t i = 0; i < members_.size(); ++i) {
        const std::string& m = members_[i];
        const std::size_t after = dot + 1 + m.size();
        if (after + 1 < v.size() && v[after] == '.' && v.substr(dot + 1, m.size()) == m &&
            !any_line_terminator(v.substr(0, dot)) && !any_line_terminator(v.substr(after + 1)))
          return match_result{s.substr(0, dot + 1) + fused_ + s.substr(after), i, {}};
      }
    }
    return std::nullopt;
  }

  // ^(.+)\.experts\.([0-9]+)\.(m0|m1|...)\.<suffix>$ -> $1.experts.<fused>. The suffix is fixed,
  // the digits run up to the next '.', so every occurrence of ".experts." (the last first, as
  // the greedy $1 tries them) leaves exactly one candidate member.
  std::optional<match_result> match_experts(const std::string& s) const {
    constexpr std::string_view experts = ".experts.";
    if (s.size() < suffix_.size() + 1 || !std::string_view(s).ends_with(suffix_) ||
        s[s.size() - suffix_.size() - 1] != '.')
      return std::nullopt;
    const std::size_t member_end = s.size() - suffix_.size() - 1;
    // Walks the dots back: std::string::rfind of a string compares at every position.
    const std::string_view v = s;
    for (std::size_t at = v.rfind('.', member_end - 1); at != std::string::npos && at >= 1;
         at = v.rfind('.', at - 1)) {
      if (v.substr(at, experts.size()) != experts) continue;
      const std::size_t first_digit = at + experts.size();
      std::size_t digit_end = first_digit;
      while (digit_end < s.size() && s[digit_end] >= '0' && s[digit_end] <= '9') ++digit_end;
      if (digit_end == first_digit || digit_end >= member_end || s[digit_end] != '.') continue;
      const std::string_view member(s.data() + digit_end + 1, member_end - digit_end - 1);
      const auto it = std::find(members_.begin(), members_.end(), member);
      if (it == members_.end() || any_line_terminator(v.substr(0, at))) continue;
      return match_result{s.substr(0, at + experts.size()) + fused_,
                          static_cast<std::size_t>(it - members_.begin()),
                          expert_index(s, v.substr(first_digit, digit_end - first_digit))};
    }
    return std::nullopt;
  }

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
  form form_ = form::pattern;
  std::string fused_;   // concat, experts: the fused name, verbatim
  std::string suffix_;  // experts: the name's last component
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
      std::string destination;  // empty for a 1:1 group, named by its source
      std::size_t rule = no_rule;
      std::size_t first = 0;  // its first source
      std::vector<member_entry> entries;  // rule groups only
    };
    std::vector<group> groups;
    const auto source_name = [&sources](std::size_t i) -> std::string_view { return sources[i].name; };
    const auto group_name = [&groups, &source_name](std::size_t g) -> std::string_view {
      return groups[g].rule == no_rule ? source_name(groups[g].first) : groups[g].destination;
    };
    detail::name_table seen(sources.size()), by_destination(sources.size());

    for (std::size_t i = 0; i < sources.size(); ++i) {
      const parameter_descriptor& s = sources[i];
      validate_source(s);
      if (seen.insert(s.name, i, source_name) != detail::name_table::npos)
        throw error(make_error_code(errc::invalid_argument),
                    "shard_map: source tensor '" + s.name + "' given twice");
      std::size_t rule = no_rule;
      std::optional<fusion_rule::match_result> m;
      for (std::size_t r = 0; r < rules_.size() && rule == no_rule; ++r)
        if ((m = rules_[r].match(s.name))) rule = r;
      const std::string_view destination = m ? std::string_view(m->destination) : s.name;
      std::size_t g = by_destination.insert(destination, groups.size(), group_name);
      if (g == detail::name_table::npos) {
        g = groups.size();
        groups.push_back({m ? std::move(m->destination) : std::string(), rule, i, {}});
      } else if (groups[g].rule != rule) {
        throw error(make_error_code(errc::invalid_argument),
                    "shard_map: destination '" + std::string(destination) + "' is produced from '" +
                        sources[groups[g].first].name + "' by " + rule_name(groups[g].rule) +
                        " and from '" + s.name + "' by " + rule_name(rule));
      }
      if (m) groups[g].entries.push_back({m->expert.value_or(0), m->member, i});
    }

    std::vector<fused_parameter> fused;
    fused.reserve(groups.size());
    for (auto& g : groups) {
      if (g.rule == no_rule) {
        const parameter_descriptor& s = sources[g.first];
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
