#include <shardline/plan/shard_map.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace sl = shardline;

namespace {

using shape_t = std::vector<std::int64_t>;

constexpr std::int64_t hidden = 16, kv = 8, inter = 24, experts = 4, expert_inter = 6;

// A small Qwen-style model in Hugging Face naming; `moe` swaps the dense MLP for experts.
std::vector<sl::parameter_descriptor> qwen(bool moe, int layers = 2) {
  std::vector<sl::parameter_descriptor> t;
  auto add = [&t](std::string name, shape_t shape) {
    t.push_back({std::move(name), sl::dtype::bf16, std::move(shape)});
  };
  add("model.embed_tokens.weight", {32, hidden});
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {hidden});
    add(p + "self_attn.q_proj.weight", {hidden, hidden});
    add(p + "self_attn.k_proj.weight", {kv, hidden});
    add(p + "self_attn.v_proj.weight", {kv, hidden});
    add(p + "self_attn.o_proj.weight", {hidden, hidden});
    add(p + "post_attention_layernorm.weight", {hidden});
    if (!moe) {
      add(p + "mlp.gate_proj.weight", {inter, hidden});
      add(p + "mlp.up_proj.weight", {inter, hidden});
      add(p + "mlp.down_proj.weight", {hidden, inter});
    } else {
      add(p + "mlp.gate.weight", {experts, hidden});
      for (int e = 0; e < experts; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        add(x + "gate_proj.weight", {expert_inter, hidden});
        add(x + "up_proj.weight", {expert_inter, hidden});
        add(x + "down_proj.weight", {hidden, expert_inter});
      }
    }
  }
  add("model.norm.weight", {hidden});
  add("lm_head.weight", {32, hidden});
  return t;
}

const sl::fused_parameter& get(const std::vector<sl::fused_parameter>& fused, std::string_view name) {
  for (const auto& f : fused)
    if (f.destination.name == name) return f;
  FAIL("no fused parameter " << name);
  throw;
}

// Shards sorted by index and tiling [0, destination.bytes()) in index order.
void check_tiling(const sl::fused_parameter& f) {
  INFO("parameter " << f.destination.name);
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < f.shards.size(); ++i) {
    CHECK(f.shards[i].index == i);
    CHECK(f.shards[i].offset == offset);
    CHECK(f.shards[i].tensor.type == f.destination.type);
    offset += f.shards[i].tensor.bytes();
  }
  CHECK(offset == f.destination.bytes());
}

template <class F>
void check_error(F&& f, sl::errc code, std::initializer_list<std::string_view> words) {
  try {
    f();
    FAIL("no error thrown");
  } catch (const sl::error& e) {
    const std::string what = e.what();
    INFO("message: " << what);
    CHECK(e.code() == sl::make_error_code(code));
    for (auto w : words) CHECK_MESSAGE(what.find(w) != std::string::npos, "missing: " << w);
  }
}

std::vector<sl::fused_parameter> fuse(std::vector<sl::parameter_descriptor> v,
                                      const sl::shard_map& m = sl::shard_map::standard()) {
  return m.fuse(v);
}

}  // namespace

TEST_CASE("shard_map: standard map fuses q/k/v and gate/up of a dense Qwen model") {
  const auto model = qwen(false);
  const auto fused = fuse(model);
  // embed, lm_head, norm + per layer: 2 norms, qkv, o, gate_up, down.
  CHECK(fused.size() == 3 + 2 * 6);
  for (const auto& f : fused) check_tiling(f);

  const auto& qkv = get(fused, "model.layers.1.self_attn.qkv_proj.weight");
  CHECK(qkv.destination.shape == shape_t{hidden + 2 * kv, hidden});
  CHECK(qkv.destination.type == sl::dtype::bf16);
  REQUIRE(qkv.shards.size() == 3);
  CHECK(qkv.shards[0].tensor.name == "model.layers.1.self_attn.q_proj.weight");
  CHECK(qkv.shards[1].tensor.name == "model.layers.1.self_attn.k_proj.weight");
  CHECK(qkv.shards[2].tensor.name == "model.layers.1.self_attn.v_proj.weight");
  CHECK(qkv.shards[1].offset == std::uint64_t(hidden * hidden * 2));
  CHECK(qkv.shards[2].offset == std::uint64_t((hidden * hidden + kv * hidden) * 2));
  CHECK(qkv.shard_names() == std::vector<std::string>{"q_proj", "k_proj", "v_proj"});

  const auto& gate_up = get(fused, "model.layers.0.mlp.gate_up_proj.weight");
  CHECK(gate_up.destination.shape == shape_t{2 * inter, hidden});
  REQUIRE(gate_up.shards.size() == 2);
  CHECK(gate_up.shards[0].tensor.name == "model.layers.0.mlp.gate_proj.weight");
  CHECK(gate_up.shards[1].offset == std::uint64_t(inter * hidden * 2));

  const auto& o = get(fused, "model.layers.0.self_attn.o_proj.weight");
  REQUIRE(o.shards.size() == 1);
  CHECK(o.destination == o.shards[0].tensor);
  CHECK(get(fused, "model.layers.0.mlp.down_proj.weight").shards.size() == 1);
  CHECK(get(fused, "model.norm.weight").destination.shape == shape_t{hidden});
}

TEST_CASE("shard_map: destinations come in first-appearance order, shards in layout order") {
  // v before q: the destination appears where v does, the shards are still q, k, v.
  const auto fused = fuse({{"a.weight", sl::dtype::f16, {4}},
                           {"l.v_proj.weight", sl::dtype::f16, {2, 4}},
                           {"b.weight", sl::dtype::f16, {4}},
                           {"l.q_proj.weight", sl::dtype::f16, {4, 4}},
                           {"l.k_proj.weight", sl::dtype::f16, {2, 4}}});
  REQUIRE(fused.size() == 3);
  CHECK(fused[0].destination.name == "a.weight");
  CHECK(fused[1].destination.name == "l.qkv_proj.weight");
  CHECK(fused[2].destination.name == "b.weight");
  CHECK(fused[1].shard_names() == std::vector<std::string>{"q_proj", "k_proj", "v_proj"});
  check_tiling(fused[1]);
}

TEST_CASE("shard_map: biases fuse separately from weights") {
  const auto fused = fuse({{"l.q_proj.weight", sl::dtype::bf16, {4, 4}},
                           {"l.q_proj.bias", sl::dtype::bf16, {4}},
                           {"l.k_proj.weight", sl::dtype::bf16, {2, 4}},
                           {"l.k_proj.bias", sl::dtype::bf16, {2}},
                           {"l.v_proj.weight", sl::dtype::bf16, {2, 4}},
                           {"l.v_proj.bias", sl::dtype::bf16, {2}}});
  REQUIRE(fused.size() == 2);
  CHECK(get(fused, "l.qkv_proj.weight").destination.shape == shape_t{8, 4});
  CHECK(get(fused, "l.qkv_proj.bias").destination.shape == shape_t{8});
}

TEST_CASE("shard_map: standard map stacks MoE experts into w13 and w2") {
  const auto fused = fuse(qwen(true));
  // embed, lm_head, norm + per layer: 2 norms, qkv, o, router gate, w13, w2.
  CHECK(fused.size() == 3 + 2 * 7);
  for (const auto& f : fused) check_tiling(f);

  const auto& w13 = get(fused, "model.layers.1.mlp.experts.w13_weight");
  CHECK(w13.destination.shape == shape_t{experts, 2 * expert_inter, hidden});
  REQUIRE(w13.shards.size() == 2 * experts);
  const std::uint64_t member = expert_inter * hidden * 2;
  for (std::size_t e = 0; e < experts; ++e) {
    const std::string x = "model.layers.1.mlp.experts." + std::to_string(e) + ".";
    CHECK(w13.shards[2 * e].tensor.name == x + "gate_proj.weight");
    CHECK(w13.shards[2 * e + 1].tensor.name == x + "up_proj.weight");
    CHECK(w13.shards[2 * e].offset == 2 * e * member);
    CHECK(w13.shards[2 * e + 1].offset == (2 * e + 1) * member);
  }
  CHECK(w13.shard_names()[3] == "expert 1 up_proj");

  const auto& w2 = get(fused, "model.layers.0.mlp.experts.w2_weight");
  CHECK(w2.destination.shape == shape_t{experts, hidden, expert_inter});
  REQUIRE(w2.shards.size() == experts);
  CHECK(w2.shards[2].tensor.name == "model.layers.0.mlp.experts.2.down_proj.weight");
  CHECK(w2.shard_names()[2] == "expert 2 down_proj");
  // The router is not an expert projection and stays 1:1.
  CHECK(get(fused, "model.layers.0.mlp.gate.weight").shards.size() == 1);
}

TEST_CASE("shard_map: experts listed out of order still land at their index") {
  std::vector<sl::parameter_descriptor> v;
  for (int e : {2, 0, 1})
    v.push_back({"m.experts." + std::to_string(e) + ".down_proj.weight", sl::dtype::f32, {3, 2}});
  const auto fused = fuse(v);
  REQUIRE(fused.size() == 1);
  CHECK(fused[0].destination.shape == shape_t{3, 3, 2});
  CHECK(fused[0].shards[0].tensor.name == "m.experts.0.down_proj.weight");
  CHECK(fused[0].shards[2].tensor.name == "m.experts.2.down_proj.weight");
  check_tiling(fused[0]);
}

TEST_CASE("shard_map: identity maps every source 1:1") {
  const auto model = qwen(true, 1);
  const auto fused = fuse(model, sl::shard_map::identity());
  REQUIRE(fused.size() == model.size());
  for (std::size_t i = 0; i < model.size(); ++i) {
    CHECK(fused[i].destination == model[i]);
    REQUIRE(fused[i].shards.size() == 1);
    CHECK(fused[i].shards[0].offset == 0);
  }
}

TEST_CASE("shard_map: a user rule fuses Llama-style w1/w3 and is tried after the standard ones") {
  auto map = sl::shard_map::standard();
  map.add(sl::fusion_rule("^(.+)\\.feed_forward\\.(w1|w3)\\.weight$", "$1.feed_forward.w13.weight", 2,
                          {"w1", "w3"}));
  const auto fused = fuse({{"layers.0.feed_forward.w3.weight", sl::dtype::bf16, {6, 4}},
                           {"layers.0.feed_forward.w1.weight", sl::dtype::bf16, {6, 4}},
                           {"layers.0.feed_forward.w2.weight", sl::dtype::bf16, {4, 6}},
                           {"layers.0.attention.q_proj.weight", sl::dtype::bf16, {4, 4}},
                           {"layers.0.attention.k_proj.weight", sl::dtype::bf16, {4, 4}},
                           {"layers.0.attention.v_proj.weight", sl::dtype::bf16, {4, 4}}},
                          map);
  REQUIRE(fused.size() == 3);
  const auto& w13 = get(fused, "layers.0.feed_forward.w13.weight");
  CHECK(w13.destination.shape == shape_t{12, 4});
  CHECK(w13.shard_names() == std::vector<std::string>{"w1", "w3"});
  CHECK(w13.shards[0].tensor.name == "layers.0.feed_forward.w1.weight");
  check_tiling(w13);
  CHECK(get(fused, "layers.0.attention.qkv_proj.weight").shards.size() == 3);
}

TEST_CASE("shard_map: a user expert rule with its own suffix") {
  sl::shard_map map;
  map.add(sl::fusion_rule::experts({"w1", "w3"}, "w13", "w"));
  const auto fused = fuse({{"b.experts.1.w1.w", sl::dtype::i8, {2, 3}},
                           {"b.experts.0.w3.w", sl::dtype::i8, {2, 3}},
                           {"b.experts.0.w1.w", sl::dtype::i8, {2, 3}},
                           {"b.experts.1.w3.w", sl::dtype::i8, {2, 3}}},
                          map);
  REQUIRE(fused.size() == 1);
  CHECK(fused[0].destination.name == "b.experts.w13");
  CHECK(fused[0].destination.shape == shape_t{2, 4, 3});
  CHECK(fused[0].shards[1].tensor.name == "b.experts.0.w3.w");
  check_tiling(fused[0]);
}

TEST_CASE("shard_map: a rule whose member group holds a non-member does not apply") {
  sl::shard_map map;
  map.add(sl::fusion_rule("^(.+)\\.(\\w+)$", "$1.fused", 2, {"a", "b"}));
  const auto fused = fuse({{"x.a", sl::dtype::f32, {1}}, {"x.c", sl::dtype::f32, {1}},
                           {"x.b", sl::dtype::f32, {1}}},
                          map);
  REQUIRE(fused.size() == 2);
  CHECK(fused[0].destination.name == "x.fused");
  CHECK(fused[1].destination.name == "x.c");
}

TEST_CASE("shard_map: members of one fused parameter with different dtypes are an error") {
  check_error([] { fuse({{"l.q_proj.weight", sl::dtype::bf16, {4, 4}}, {"l.k_proj.weight", sl::dtype::f16, {2, 4}},
                         {"l.v_proj.weight", sl::dtype::bf16, {2, 4}}}); },
              sl::errc::invalid_argument,
              {"l.qkv_proj.weight", "l.k_proj.weight", "l.q_proj.weight", "f16", "bf16", "dtype"});
}

TEST_CASE("shard_map: members with different trailing dims are an error") {
  check_error([] { fuse({{"l.gate_proj.weight", sl::dtype::bf16, {6, 4}},
                         {"l.up_proj.weight", sl::dtype::bf16, {6, 5}}}); },
              sl::errc::size_mismatch,
              {"l.gate_up_proj.weight", "l.up_proj.weight", "[6, 5]", "l.gate_proj.weight", "[6, 4]",
               "past dim 0"});
}

TEST_CASE("shard_map: a member given twice is an error") {
  check_error([] { fuse({{"m.experts.0.down_proj.weight", sl::dtype::bf16, {4, 2}},
                         {"m.experts.1.down_proj.weight", sl::dtype::bf16, {4, 2}},
                         {"m.experts.01.down_proj.weight", sl::dtype::bf16, {4, 2}}}); },
              sl::errc::invalid_argument,
              {"m.experts.w2_weight", "expert 1 down_proj", "given twice", "m.experts.1.down_proj.weight",
               "m.experts.01.down_proj.weight"});
  sl::shard_map map;
  map.add(sl::fusion_rule("^(.+)\\.(?:lora_)?(q|k)$", "$1.qk", 2, {"q", "k"}));
  check_error([&map] { fuse({{"x.q", sl::dtype::f32, {2}}, {"x.k", sl::dtype::f32, {2}},
                             {"x.lora_q", sl::dtype::f32, {2}}}, map); },
              sl::errc::invalid_argument, {"x.qk", "'x.q'", "'x.lora_q'", "given twice"});
}

TEST_CASE("shard_map: expert indices with a gap are an error") {
  std::vector<sl::parameter_descriptor> v;
  for (int e : {0, 1, 3})
    v.push_back({"m.experts." + std::to_string(e) + ".down_proj.weight", sl::dtype::bf16, {4, 2}});
  check_error([&v] { fuse(v); }, sl::errc::invalid_argument,
              {"m.experts.w2_weight", "expert 2 is missing", "0..E-1", "m.experts.3.down_proj.weight"});
}

TEST_CASE("shard_map: experts not starting at 0 are an error") {
  check_error([] { fuse({{"m.experts.1.down_proj.weight", sl::dtype::bf16, {4, 2}}}); },
              sl::errc::invalid_argument, {"m.experts.w2_weight", "expert 0 is missing"});
}

TEST_CASE("shard_map: an expert without one of its members is an error") {
  check_error([] { fuse({{"m.experts.0.gate_proj.weight", sl::dtype::bf16, {4, 2}},
                         {"m.experts.0.up_proj.weight", sl::dtype::bf16, {4, 2}},
                         {"m.experts.1.gate_proj.weight", sl::dtype::bf16, {4, 2}}}); },
              sl::errc::invalid_argument, {"m.experts.w13_weight", "expert 1 up_proj", "missing"});
  check_error([] { fuse({{"l.q_proj.weight", sl::dtype::bf16, {4, 4}},
                         {"l.v_proj.weight", sl::dtype::bf16, {2, 4}}}); },
              sl::errc::invalid_argument, {"l.qkv_proj.weight", "k_proj is missing"});
}

TEST_CASE("shard_map: experts of different shapes are an error") {
  check_error([] { fuse({{"m.experts.0.down_proj.weight", sl::dtype::bf16, {4, 2}},
                         {"m.experts.1.down_proj.weight", sl::dtype::bf16, {4, 2}},
                         {"m.experts.2.down_proj.weight", sl::dtype::bf16, {6, 2}}}); },
              sl::errc::size_mismatch,
              {"m.experts.w2_weight", "expert 2 down_proj", "m.experts.2.down_proj.weight", "[6, 2]",
               "expert 0 down_proj", "[4, 2]", "same shape"});
}

TEST_CASE("shard_map: the same source name twice is an error") {
  check_error([] { fuse({{"model.norm.weight", sl::dtype::bf16, {4}}, {"model.norm.weight", sl::dtype::bf16, {4}}}); },
              sl::errc::invalid_argument, {"model.norm.weight", "given twice"});
}

TEST_CASE("shard_map: one destination name from two rules is an error") {
  check_error([] { fuse({{"l.qkv_proj.weight", sl::dtype::bf16, {4, 4}}, {"l.q_proj.weight", sl::dtype::bf16, {4, 4}},
                         {"l.k_proj.weight", sl::dtype::bf16, {4, 4}}, {"l.v_proj.weight", sl::dtype::bf16, {4, 4}}}); },
              sl::errc::invalid_argument,
              {"destination 'l.qkv_proj.weight'", "'l.q_proj.weight'", "no rule (1:1)", "qkv"});
}

TEST_CASE("shard_map: malformed source descriptors are errors naming the tensor") {
  check_error([] { fuse({{"w", sl::dtype::bf16, {4, -1}}}); }, sl::errc::invalid_argument,
              {"'w'", "negative dimension", "[4, -1]"});
  check_error([] { fuse({{"", sl::dtype::bf16, {4}}}); }, sl::errc::invalid_argument, {"name is empty"});
  check_error([] { fuse({{"w", static_cast<sl::dtype>(99), {4}}}); }, sl::errc::invalid_argument,
              {"'w'", "unknown dtype", "99"});
  check_error([] { fuse({{"w", sl::dtype::i64, {1ll << 40, 1ll << 30}}}); }, sl::errc::invalid_argument,
              {"'w'", "2^64"});
  check_error([] { fuse({{"l.gate_proj.weight", sl::dtype::f32, {}}, {"l.up_proj.weight", sl::dtype::f32, {}}}); },
              sl::errc::invalid_argument, {"l.gate_up_proj.weight", "l.gate_proj.weight", "scalar"});
  check_error([] { fuse({{"m.experts.99999999999999999999999.down_proj.weight", sl::dtype::f32, {2}}}); },
              sl::errc::invalid_argument, {"m.experts.99999999999999999999999.down_proj.weight", "expert index"});
}

TEST_CASE("shard_map: malformed rules are errors naming the pattern") {
  check_error([] { sl::fusion_rule("([a-z", "$1", 1, {"a"}); }, sl::errc::invalid_argument,
              {"fusion_rule '([a-z'", "does not compile"});
  check_error([] { sl::fusion_rule("(a)\\.(b)", "$1", 3, {"a"}); }, sl::errc::invalid_argument,
              {"(a)\\.(b)", "member_group 3", "has 2"});
  check_error([] { sl::fusion_rule("(a)\\.(b)", "$1", 0, {"a"}); }, sl::errc::invalid_argument,
              {"member_group 0"});
  check_error([] { sl::fusion_rule("(a)\\.(b)", "$1", 1, {"a"}, 5); }, sl::errc::invalid_argument,
              {"expert_group 5"});
  check_error([] { sl::fusion_rule("(a)\\.(b)", "$1", 1, {"a"}, 1); }, sl::errc::invalid_argument,
              {"both group 1"});
  check_error([] { sl::fusion_rule("(a)", "$1", 1, {}); }, sl::errc::invalid_argument, {"'(a)'", "no members"});
  check_error([] { sl::fusion_rule("(a)", "$1", 1, {"a", "a"}); }, sl::errc::invalid_argument,
              {"member 'a' listed twice"});
}

namespace {

// What a rule makes of a name, as text: its match, "none", or the error it throws.
std::string outcome(const sl::fusion_rule& rule, const std::string& name) {
  try {
    const auto m = rule.match(name);
    if (!m) return "none";
    return m->destination + " | member " + std::to_string(m->member) + " | expert " +
           (m->expert ? std::to_string(*m->expert) : "-");
  } catch (const sl::error& e) {
    return std::string("error: ") + e.what();
  }
}

}  // namespace

TEST_CASE("shard_map: the factory rules match exactly as their regular expressions do") {
  // concat and experts rules are matched without std::regex; the same pattern given to the
  // constructor is matched by std::regex. Names from pieces that make the patterns match,
  // nearly match, or hold line terminators ('.' of ECMAScript does not match them).
  const std::vector<sl::fusion_rule> rules{
      sl::fusion_rule::concat({"q_proj", "k_proj", "v_proj"}, "qkv_proj"),
      sl::fusion_rule::concat({"gate_proj", "up_proj"}, "gate_up_proj"),
      sl::fusion_rule::experts({"gate_proj", "up_proj"}, "w13_weight"),
      sl::fusion_rule::experts({"down_proj"}, "w2_weight"),
      sl::fusion_rule::experts({"w1", "w3"}, "w$13", "w"),
      sl::fusion_rule::concat({"gate", "gate.up", ""}, "g$u"),
  };
  const std::vector<std::string> pieces{
      "model", "layers", "0", "17", "007", "99999999999999999999999", "experts", "q_proj", "k_proj",
      "v_proj", "gate_proj", "up_proj", "down_proj", "gate", "gate.up", "w1", "w3", "w", "weight",
      "bias", "", "a\nb", "\r", "x.experts", "experts.3"};
  std::mt19937 rng(2024);
  const auto pick = [&rng](std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n - 1)(rng); };
  std::size_t matched = 0;
  for (const auto& rule : rules) {
    const sl::fusion_rule regex(rule.pattern(), rule.destination(), rule.stacks_experts() ? 3 : 2, rule.members(),
                                rule.stacks_experts() ? 2 : 0);
    for (int i = 0; i < 1500; ++i) {
      std::string name;
      if (i % 2 == 0) {
        // The rule's shape: prefix [.experts.N].member.suffix, with random pieces swapped in.
        name = pieces[pick(pieces.size())] + "." + pieces[pick(pieces.size())];
        if (rule.stacks_experts()) name += ".experts." + pieces[pick(5) + 2];
        name += "." + (pick(3) ? rule.members()[pick(rule.members().size())] : pieces[pick(pieces.size())]);
        name += "." + (pick(3) ? std::string(rule.stacks_experts() && rule.members()[0] == "w1" ? "w" : "weight")
                               : pieces[pick(pieces.size())]);
      } else {
        for (std::size_t n = pick(6) + 1; n > 0; --n) name += (name.empty() && pick(2) ? "" : ".") + pieces[pick(pieces.size())];
      }
      INFO("rule " << rule.pattern() << " name '" << name << "'");
      const std::string expected = outcome(regex, name);
      CHECK(outcome(rule, name) == expected);
      matched += expected != "none";
    }
  }
  CHECK(matched > 1000);  // the names above do exercise matches
}

TEST_CASE("shard_map: the name table finds every name it stored, also past its reservation") {
  std::vector<std::string> names;
  for (int i = 0; i < 5000; ++i) names.push_back("model.layers." + std::to_string(i) + ".mlp.weight");
  const auto name_of = [&names](std::size_t i) -> std::string_view { return names[i]; };
  sl::detail::name_table table(10);  // grows as names come
  for (std::size_t i = 0; i < names.size(); ++i) CHECK(table.insert(names[i], i, name_of) == table.npos);
  for (std::size_t i = 0; i < names.size(); ++i) {
    CHECK(table.find(names[i], name_of) == i);
    CHECK(table.insert(names[i], names.size(), name_of) == i);  // already there: the first id
  }
  CHECK(table.find("model.layers.5000.mlp.weight", name_of) == table.npos);
  CHECK(sl::detail::name_table().find("x", name_of) == sl::detail::name_table::npos);
}
