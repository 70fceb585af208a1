#include <shardline/plan/transfer_plan.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace sl = shardline;

namespace {

using shape_t = std::vector<std::int64_t>;

constexpr std::int64_t hidden = 16, kv = 8, inter = 24, experts = 4, expert_inter = 6;

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
      for (int e = 0; e < experts; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        add(x + "gate_proj.weight", {expert_inter, hidden});
        add(x + "up_proj.weight", {expert_inter, hidden});
        add(x + "down_proj.weight", {hidden, expert_inter});
      }
    }
  }
  add("model.norm.weight", {hidden});
  return t;
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

sl::transfer_plan build(const std::vector<sl::parameter_descriptor>& model, sl::plan_options o = {}) {
  return sl::transfer_plan::build(model, sl::shard_map::standard(), std::move(o));
}

sl::plan_options tp_options(std::size_t tp, std::size_t replicas = 1) {
  sl::plan_options o;
  o.tensor_parallel = tp;
  o.replicas = replicas;
  return o;
}

std::map<std::string, shape_t> shapes_of(const std::vector<sl::parameter_descriptor>& v) {
  std::map<std::string, shape_t> m;
  for (const auto& p : v) m[p.name] = p.shape;
  return m;
}

}  // namespace

TEST_CASE("transfer_plan: default split replicates norms and 1-D, splits o_proj/down_proj/w2 by columns") {
  using sl::tp_split;
  CHECK(sl::default_split({"model.norm.weight", sl::dtype::bf16, {4, 4}}) == tp_split::replicate);
  CHECK(sl::default_split({"l.self_attn.qkv_proj.bias", sl::dtype::bf16, {4}}) == tp_split::replicate);
  CHECK(sl::default_split({"l.self_attn.o_proj.weight", sl::dtype::bf16, {4, 4}}) == tp_split::columns);
  CHECK(sl::default_split({"l.mlp.down_proj.weight", sl::dtype::bf16, {4, 4}}) == tp_split::columns);
  CHECK(sl::default_split({"l.mlp.experts.w2_weight", sl::dtype::bf16, {2, 4, 4}}) == tp_split::columns);
  CHECK(sl::default_split({"l.mlp.experts.w13_weight", sl::dtype::bf16, {2, 4, 4}}) == tp_split::rows);
  CHECK(sl::default_split({"l.self_attn.qkv_proj.weight", sl::dtype::bf16, {4, 4}}) == tp_split::rows);
  CHECK(sl::default_split({"l.mlp.gate_up_proj.weight", sl::dtype::bf16, {4, 4}}) == tp_split::rows);
  CHECK(sl::to_string(tp_split::columns) == "columns");
}

TEST_CASE("transfer_plan: one receiver gets every parameter whole, in one write each") {
  const auto plan = build(qwen(false));
  CHECK(plan.receivers() == 1);
  std::uint64_t total = 0;
  for (const auto& b : plan.buckets())
    for (const auto& p : b.parameters) {
      INFO(p.parameter.destination.name);
      REQUIRE(p.writes.size() == 1);
      CHECK(p.writes[0] == sl::planned_write{0, 0, 0, p.parameter.destination.bytes()});
      CHECK(p.slice == p.parameter.destination);
      total += p.parameter.destination.bytes();
    }
  CHECK(plan.total_bytes() == total);
  CHECK(plan.find("model.layers.1.self_attn.qkv_proj.weight") != nullptr);
  CHECK(plan.find("model.layers.1.self_attn.q_proj.weight") == nullptr);
  CHECK(plan.find("nope") == nullptr);
}

TEST_CASE("transfer_plan: replicas repeat the same writes per receiver group") {
  const auto plan = build(qwen(false), tp_options(2, 2));
  CHECK(plan.receivers() == 4);
  const auto* qkv = plan.find("model.layers.0.self_attn.qkv_proj.weight");
  REQUIRE(qkv != nullptr);
  std::vector<sl::planned_write> r1, r3;
  for (auto w : qkv->writes) {
    if (w.receiver == 1) r1.push_back(w);
    if (w.receiver == 3) {
      w.receiver = 1;
      r3.push_back(w);
    }
  }
  CHECK(!r1.empty());
  CHECK(r1 == r3);
  CHECK(plan.receiver_parameters(0) == plan.receiver_parameters(3));
}

TEST_CASE("transfer_plan: tensor-parallel receivers expose sliced shapes") {
  const auto dense = shapes_of(build(qwen(false), tp_options(2)).receiver_parameters(1));
  CHECK(dense.at("model.embed_tokens.weight") == shape_t{16, hidden});
  CHECK(dense.at("model.layers.0.input_layernorm.weight") == shape_t{hidden});
  CHECK(dense.at("model.layers.0.self_attn.qkv_proj.weight") == shape_t{(hidden + 2 * kv) / 2, hidden});
  CHECK(dense.at("model.layers.0.self_attn.o_proj.weight") == shape_t{hidden, hidden / 2});
  CHECK(dense.at("model.layers.1.mlp.gate_up_proj.weight") == shape_t{inter, hidden});
  CHECK(dense.at("model.layers.1.mlp.down_proj.weight") == shape_t{hidden, inter / 2});
  CHECK(dense.at("model.norm.weight") == shape_t{hidden});
  CHECK(dense.size() == 2 + 2 * 6);

  const auto moe = shapes_of(build(qwen(true), tp_options(2)).receiver_parameters(0));
  CHECK(moe.at("model.layers.0.mlp.experts.w13_weight") == shape_t{experts, expert_inter, hidden});
  CHECK(moe.at("model.layers.0.mlp.experts.w2_weight") == shape_t{experts, hidden, expert_inter / 2});
}

TEST_CASE("transfer_plan: a row split takes each shard's rows, as vLLM lays out qkv") {
  const auto plan = build(qwen(false), tp_options(2));
  const auto* qkv = plan.find("model.layers.0.self_attn.qkv_proj.weight");
  REQUIRE(qkv != nullptr);
  CHECK(qkv->split == sl::tp_split::rows);
  std::vector<sl::planned_write> rank1;
  for (auto w : qkv->writes)
    if (w.receiver == 1) rank1.push_back(w);
  const std::uint64_t row = hidden * 2, q = hidden * row, k = kv * row;
  // receiver, staging, destination, bytes, sender, shard
  CHECK(rank1 == std::vector<sl::planned_write>{{1, q / 2, 0, q / 2, 0, 0},
                                                {1, q + k / 2, q / 2, k / 2, 0, 1},
                                                {1, q + k + k / 2, q / 2 + k / 2, k / 2, 0, 2}});
  // Rank 0's q and k halves are not adjacent in staging: nothing to coalesce either.
  CHECK(qkv->writes.size() == 6);
}

TEST_CASE("transfer_plan: a column split writes one strided row at a time") {
  const auto plan = build(qwen(false), tp_options(2));
  const auto* o = plan.find("model.layers.1.self_attn.o_proj.weight");
  REQUIRE(o != nullptr);
  CHECK(o->split == sl::tp_split::columns);
  CHECK(o->writes.size() == 2 * hidden);
  const std::uint64_t row = hidden * 2;
  for (const auto& w : o->writes) {
    const std::uint64_t i = w.destination_offset / (row / 2);
    CHECK(w.bytes == row / 2);
    CHECK(w.staging_offset == i * row + w.receiver * row / 2);
  }
}

TEST_CASE("transfer_plan: a user split function overrides the default") {
  auto o = tp_options(2);
  o.split = [](const sl::parameter_descriptor&) { return sl::tp_split::replicate; };
  const auto plan = build(qwen(false), o);
  CHECK(plan.receiver_parameters(1) == plan.receiver_parameters(0));
  for (const auto& b : plan.buckets())
    for (const auto& p : b.parameters) CHECK(p.writes.size() == 2);
}

TEST_CASE("transfer_plan: invalid options are errors naming the option") {
  const auto model = qwen(false, 1);
  check_error([&] { build(model, tp_options(0)); }, sl::errc::invalid_argument, {"tensor_parallel is 0"});
  check_error([&] { build(model, tp_options(1, 0)); }, sl::errc::invalid_argument, {"replicas is 0"});
  sl::plan_options o;
  o.bucket_bytes = 0;
  check_error([&] { build(model, o); }, sl::errc::invalid_argument, {"bucket_bytes is 0"});
  o = {};
  o.staging_alignment = 48;
  check_error([&] { build(model, o); }, sl::errc::invalid_argument, {"staging_alignment is 48", "power of two"});
}

TEST_CASE("transfer_plan: a shard whose rows do not divide by tensor_parallel is an error naming it") {
  // q's 12 rows divide by 4, k's 6 do not.
  std::vector<sl::parameter_descriptor> m{{"l.q_proj.weight", sl::dtype::bf16, {12, 4}},
                                          {"l.k_proj.weight", sl::dtype::bf16, {6, 4}},
                                          {"l.v_proj.weight", sl::dtype::bf16, {6, 4}}};
  check_error([&] { build(m, tp_options(4)); }, sl::errc::invalid_argument,
              {"'l.qkv_proj.weight'", "shard 1", "'l.k_proj.weight'", "6 rows", "not divisible by tensor_parallel 4"});
  check_error([] { build(qwen(true, 1), tp_options(4)); }, sl::errc::invalid_argument,
              {"'model.layers.0.mlp.experts.w13_weight'", "shard 0", "model.layers.0.mlp.experts.0.gate_proj.weight",
               "6 rows"});
}

TEST_CASE("transfer_plan: a last dim that does not divide by tensor_parallel is an error naming it") {
  std::vector<sl::parameter_descriptor> m{{"l.o_proj.weight", sl::dtype::bf16, {8, 6}}};
  check_error([&] { build(m, tp_options(4)); }, sl::errc::invalid_argument,
              {"'l.o_proj.weight'", "last dim 6", "[8, 6]", "not divisible by tensor_parallel 4"});
}

TEST_CASE("transfer_plan: splitting a scalar or an unknown split is an error naming the parameter") {
  std::vector<sl::parameter_descriptor> m{{"scale", sl::dtype::f32, {}}};
  auto o = tp_options(2);
  o.split = [](const sl::parameter_descriptor&) { return sl::tp_split::rows; };
  check_error([&] { build(m, o); }, sl::errc::invalid_argument, {"'scale'", "scalar", "rows"});
  o.split = [](const sl::parameter_descriptor&) { return sl::tp_split::columns; };
  check_error([&] { build(m, o); }, sl::errc::invalid_argument, {"'scale'", "scalar", "columns"});
  o.split = [](const sl::parameter_descriptor&) { return static_cast<sl::tp_split>(7); };
  check_error([&] { build(m, o); }, sl::errc::invalid_argument, {"'scale'", "unknown tp_split"});
  // Replicated (the default for a scalar), it is fine.
  CHECK(build(m, tp_options(2)).receiver_parameters(1).front().shape.empty());
}

TEST_CASE("transfer_plan: buckets respect the byte budget and keep each fused parameter whole") {
  sl::plan_options o;
  o.staging_alignment = 1;
  o.bucket_bytes = 1200;
  // qkv is 1024 bytes, more than q alone: it still travels whole.
  const auto plan = build(qwen(false), o);
  std::vector<std::string> order;
  for (const auto& b : plan.buckets()) {
    REQUIRE(!b.parameters.empty());
    if (b.parameters.size() > 1) CHECK(b.staging_bytes <= o.bucket_bytes);
    std::uint64_t end = 0;
    for (const auto& p : b.parameters) {
      CHECK(p.staging_offset >= end);
      end = p.staging_offset + p.parameter.destination.bytes();
      order.push_back(p.parameter.destination.name);
    }
    CHECK(b.staging_bytes == end);
  }
  const auto fused = sl::shard_map::standard().fuse(qwen(false));
  REQUIRE(order.size() == fused.size());
  for (std::size_t i = 0; i < order.size(); ++i) CHECK(order[i] == fused[i].destination.name);
  // gate_up (1536 bytes) is over budget: a bucket of its own.
  const auto* gate_up = plan.find("model.layers.0.mlp.gate_up_proj.weight");
  REQUIRE(gate_up != nullptr);
  for (const auto& b : plan.buckets())
    if (&b.parameters.front() <= gate_up && gate_up <= &b.parameters.back()) {
      CHECK(b.parameters.size() == 1);
      CHECK(b.staging_bytes == 1536);
    }
  CHECK(plan.max_staging_bytes() == 1536);
}

TEST_CASE("transfer_plan: exact bucket composition with alignment") {
  std::vector<sl::parameter_descriptor> m{{"a", sl::dtype::i8, {10}},   {"b", sl::dtype::i8, {20}},
                                          {"c", sl::dtype::i8, {100}}, {"d", sl::dtype::i8, {1}},
                                          {"e", sl::dtype::i8, {60}},  {"f", sl::dtype::i8, {64}}};
  sl::plan_options o;
  o.bucket_bytes = 64;
  o.staging_alignment = 16;
  const auto plan = sl::transfer_plan::build(m, sl::shard_map::identity(), o);
  // a@0 b@16 | c alone (over budget) | d@0, e would end at 76 | e | f exactly fills a bucket.
  REQUIRE(plan.buckets().size() == 5);
  const auto& b = plan.buckets();
  CHECK(b[0].parameters.size() == 2);
  CHECK(b[0].parameters[1].staging_offset == 16);
  CHECK(b[0].staging_bytes == 36);
  CHECK(b[1].parameters.front().parameter.destination.name == "c");
  CHECK(b[1].staging_bytes == 100);
  CHECK(b[2].parameters.size() == 1);
  CHECK(b[2].staging_bytes == 1);
  CHECK(b[3].parameters.front().parameter.destination.name == "e");
  CHECK(b[4].staging_bytes == 64);
  CHECK(plan.max_staging_bytes() == 100);
  CHECK(plan.total_bytes() == 255);
}

TEST_CASE("transfer_plan: the default alignment starts every parameter on 256 bytes") {
  const auto plan = build(qwen(false));
  REQUIRE(plan.buckets().size() == 1);  // 64 MiB budget
  for (const auto& p : plan.buckets().front().parameters) CHECK(p.staging_offset % 256 == 0);
}

TEST_CASE("transfer_plan: an empty model has no buckets") {
  const auto plan = build({});
  CHECK(plan.buckets().empty());
  CHECK(plan.max_staging_bytes() == 0);
  CHECK(plan.total_bytes() == 0);
  CHECK(plan.receiver_parameters(0).empty());
}

TEST_CASE("transfer_plan: validate_receiver accepts what receiver_parameters lists, plus extras") {
  const auto plan = build(qwen(true), tp_options(2, 2));
  for (std::size_t r = 0; r < plan.receivers(); ++r) {
    auto exposed = plan.receiver_parameters(r);
    exposed.push_back({"extra.buffer", sl::dtype::f32, {3}});
    CHECK_NOTHROW(plan.validate_receiver(r, exposed));
  }
}

TEST_CASE("transfer_plan: validate_receiver reports a parameter the receiver lacks") {
  const auto plan = build(qwen(false), tp_options(2));
  auto exposed = plan.receiver_parameters(1);
  exposed.erase(exposed.begin() + 3);
  const std::string name = plan.receiver_parameters(1)[3].name;
  const std::string bytes = std::to_string(plan.receiver_parameters(1)[3].bytes());
  check_error([&] { plan.validate_receiver(1, exposed); }, sl::errc::unknown_parameter,
              {"'" + name + "'", "receiver 1", "does not expose", bytes + " bytes"});
  std::error_code ec;
  plan.validate_receiver(1, exposed, ec);
  CHECK(ec == sl::errc::unknown_parameter);
}

TEST_CASE("transfer_plan: validate_receiver reports a size mismatch with both sizes") {
  const auto plan = build(qwen(false), tp_options(2));
  auto exposed = plan.receiver_parameters(0);
  // The receiver exposes the unsliced qkv: twice the plan's bytes.
  for (auto& p : exposed)
    if (p.name == "model.layers.0.self_attn.qkv_proj.weight") p.shape = {hidden + 2 * kv, hidden};
  check_error([&] { plan.validate_receiver(0, exposed); }, sl::errc::size_mismatch,
              {"'model.layers.0.self_attn.qkv_proj.weight'", "receiver 0", "exposes 1024 bytes",
               "plan sends 512 bytes"});
  std::error_code ec;
  plan.validate_receiver(0, exposed, ec);
  CHECK(ec == sl::errc::size_mismatch);
  plan.validate_receiver(0, plan.receiver_parameters(0), ec);
  CHECK(!ec);
}

TEST_CASE("transfer_plan: a receiver index past the plan's receivers is an error") {
  const auto plan = build(qwen(false, 1), tp_options(2, 2));
  check_error([&] { plan.receiver_parameters(4); }, sl::errc::invalid_argument, {"receiver 4", "4 receivers"});
  check_error([&] { plan.validate_receiver(7, {}); }, sl::errc::invalid_argument, {"receiver 7"});
}

// ---------------------------------------------------------------------------------------------
// The tiling property: for random small models, every byte of every receiver's parameter is
// written exactly once, with the byte of the right source element. The reference below derives
// each receiver's expected bytes from the layout semantics (concatenation order, per-shard row
// slices, per-row column slices), not from the plan's offsets.

namespace {

struct logical_parameter {
  std::string destination;
  std::vector<std::string> sources;  // in layout order
  bool one_dimensional = false;
};

struct random_model {
  std::vector<sl::parameter_descriptor> tensors;
  std::vector<logical_parameter> expected;
  std::map<std::string, std::size_t> id;  // source name -> index in tensors
};

random_model make_random_model(std::mt19937& rng) {
  auto pick = [&rng](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  random_model m;
  auto add = [&m](const std::string& name, sl::dtype t, shape_t shape) {
    m.id[name] = m.tensors.size();
    m.tensors.push_back({name, t, std::move(shape)});
  };
  auto single = [&m, &add](const std::string& name, sl::dtype t, shape_t shape) {
    m.expected.push_back({name, {name}, shape.size() == 1});
    add(name, t, std::move(shape));
  };
  const int layers = pick(1, 3);
  const std::int64_t h = 4 * pick(1, 4);
  for (int l = 0; l < layers; ++l) {
    const auto t = static_cast<sl::dtype>(pick(0, 6));
    const std::string p = "layers." + std::to_string(l) + ".";
    const std::int64_t hq = 4 * pick(1, 3), hk = 4 * pick(1, 2), inter = 4 * pick(1, 4);
    single(p + "input_layernorm.weight", t, {h});
    logical_parameter qkv{p + "attn.qkv_proj.weight", {}, false}, bias{p + "attn.qkv_proj.bias", {}, true};
    for (auto [name, rows] : {std::pair{"q_proj", hq}, std::pair{"k_proj", hk}, std::pair{"v_proj", hk}}) {
      qkv.sources.push_back(p + "attn." + name + ".weight");
      bias.sources.push_back(p + "attn." + name + ".bias");
    }
    // Sources in a shuffled order: the layout order must not depend on it.
    std::vector<std::pair<std::string, shape_t>> attn;
    for (std::size_t i = 0; i < 3; ++i) {
      const std::int64_t rows = i == 0 ? hq : hk;
      attn.push_back({qkv.sources[i], {rows, h}});
      attn.push_back({bias.sources[i], {rows}});
    }
    std::shuffle(attn.begin(), attn.end(), rng);
    for (auto& [name, shape] : attn) add(name, t, shape);
    m.expected.push_back(qkv);
    m.expected.push_back(bias);
    single(p + "attn.o_proj.weight", t, {h, hq});
    if (pick(0, 1) == 0) {
      logical_parameter gate_up{p + "mlp.gate_up_proj.weight", {p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"}, false};
      add(gate_up.sources[1], t, {inter, h});
      add(gate_up.sources[0], t, {inter, h});
      m.expected.push_back(gate_up);
      single(p + "mlp.down_proj.weight", t, {h, inter});
    } else {
      const int e_count = pick(1, 4);
      logical_parameter w13{p + "mlp.experts.w13_weight", {}, false}, w2{p + "mlp.experts.w2_weight", {}, false};
      for (int e = 0; e < e_count; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        w13.sources.push_back(x + "gate_proj.weight");
        w13.sources.push_back(x + "up_proj.weight");
        w2.sources.push_back(x + "down_proj.weight");
      }
      for (int e = e_count - 1; e >= 0; --e) {
        add(w13.sources[2 * e + 1], t, {inter, h});
        add(w2.sources[e], t, {h, inter});
        add(w13.sources[2 * e], t, {inter, h});
      }
      m.expected.push_back(w13);
      m.expected.push_back(w2);
    }
  }
  single("extra.scale_table", sl::dtype::f32, {4, 2, 8});
  // Destinations come in the order their first source appears.
  auto first = [&m](const logical_parameter& lp) {
    std::size_t i = m.tensors.size();
    for (const auto& s : lp.sources) i = std::min(i, m.id.at(s));
    return i;
  };
  std::stable_sort(m.expected.begin(), m.expected.end(),
                   [&first](const auto& a, const auto& b) { return first(a) < first(b); });
  return m;
}

// A byte's identity: which source tensor, which byte of it.
std::uint64_t tag(std::size_t source, std::uint64_t byte) { return (std::uint64_t(source + 1) << 32) | byte; }

// Every split for every kind of parameter, across salts.
sl::tp_split split_for(const std::string& name, std::uint32_t salt) {
  std::uint32_t h = 2166136261u ^ salt;
  for (unsigned char c : name) h = (h ^ c) * 16777619u;
  return static_cast<sl::tp_split>(h % 3);
}

// The bytes rank `rank` of `tp` must hold for `lp`, as tags, and its shape.
std::vector<std::uint64_t> reference(const random_model& m, const logical_parameter& lp, std::size_t rank,
                                     std::size_t tp, std::uint32_t salt, shape_t& shape) {
  std::vector<std::uint64_t> full, mine;
  std::vector<const sl::parameter_descriptor*> src;
  for (const auto& s : lp.sources) src.push_back(&m.tensors[m.id.at(s)]);
  for (const auto* s : src)
    for (std::uint64_t k = 0; k < s->bytes(); ++k) full.push_back(tag(m.id.at(s->name), k));
  const std::uint64_t elem = sl::size_of(src[0]->type);
  // The full destination shape, straight from the naming convention.
  const bool stacked = lp.destination.find("experts.w") != std::string::npos;
  const std::size_t members = lp.destination.ends_with("w13_weight") ? 2 : 1;
  shape = src[0]->shape;
  if (stacked) {
    shape[0] *= static_cast<std::int64_t>(members);
    shape.insert(shape.begin(), static_cast<std::int64_t>(src.size() / members));
  } else {
    shape[0] = 0;
    for (const auto* s : src) shape[0] += s->shape[0];
  }
  const sl::tp_split split = tp == 1 ? sl::tp_split::replicate : split_for(lp.destination, salt);
  if (split == sl::tp_split::replicate) return full;
  if (split == sl::tp_split::rows) {
    std::uint64_t at = 0;
    for (const auto* s : src) {
      const std::uint64_t chunk = s->bytes() / tp;
      mine.insert(mine.end(), full.begin() + at + rank * chunk, full.begin() + at + (rank + 1) * chunk);
      at += s->bytes();
    }
    shape[stacked ? 1 : 0] /= static_cast<std::int64_t>(tp);
    return mine;
  }
  const std::uint64_t row = static_cast<std::uint64_t>(shape.back()) * elem, part = row / tp;
  for (std::uint64_t i = 0; i < full.size() / row; ++i)
    mine.insert(mine.end(), full.begin() + i * row + rank * part, full.begin() + i * row + (rank + 1) * part);
  shape.back() /= static_cast<std::int64_t>(tp);
  return mine;
}

void check_senders(const sl::transfer_plan& plan, const std::map<std::string, std::size_t>& id);

void check_tiling(const random_model& m, std::size_t tp, std::size_t replicas, std::uint64_t budget,
                  std::uint64_t alignment, std::uint32_t salt, std::size_t senders = 1) {
  sl::plan_options o;
  o.tensor_parallel = tp;
  o.replicas = replicas;
  o.bucket_bytes = budget;
  o.staging_alignment = alignment;
  o.split = [salt](const sl::parameter_descriptor& p) { return split_for(p.name, salt); };
  o.senders = senders;
  if (senders > 1)
    o.sender_of = [salt, senders](const sl::parameter_descriptor& p) {
      return static_cast<std::size_t>(split_for(p.name, salt + 101) == sl::tp_split::rows ? 0 : std::hash<std::string>{}(p.name)) % senders;
    };
  const auto plan = sl::transfer_plan::build(m.tensors, sl::shard_map::standard(), o);
  REQUIRE(plan.receivers() == tp * replicas);

  // Receiver memory as tags, and how often each byte was written.
  std::vector<std::map<std::string, std::vector<std::uint64_t>>> memory(plan.receivers());
  std::vector<std::map<std::string, std::vector<int>>> writes(plan.receivers());
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    for (const auto& p : plan.receiver_parameters(r)) {
      memory[r][p.name].assign(p.bytes(), 0);
      writes[r][p.name].assign(p.bytes(), 0);
    }

  std::size_t planned = 0;
  std::uint64_t total = 0;
  for (const auto& b : plan.buckets()) {
    CHECK((b.staging_bytes <= budget || b.parameters.size() == 1));
    CHECK(b.staging_bytes <= plan.max_staging_bytes());
    // The staging slot as the loader fills it: every source at its shard's offset.
    std::vector<std::uint64_t> slot(b.staging_bytes, 0);
    std::vector<int> loaded(b.staging_bytes, 0);
    for (const auto& p : b.parameters) {
      ++planned;
      total += p.parameter.destination.bytes();
      CHECK(p.staging_offset % alignment == 0);
      for (const auto& s : p.parameter.shards) {
        const std::size_t id = m.id.at(s.tensor.name);
        CHECK(s.tensor == m.tensors[id]);
        REQUIRE(p.staging_offset + s.offset + s.tensor.bytes() <= slot.size());
        for (std::uint64_t k = 0; k < s.tensor.bytes(); ++k) {
          slot[p.staging_offset + s.offset + k] = tag(id, k);
          ++loaded[p.staging_offset + s.offset + k];
        }
      }
      for (const auto& w : p.writes) {
        REQUIRE(w.receiver < plan.receivers());
        REQUIRE(w.bytes > 0);
        REQUIRE(w.staging_offset + w.bytes <= p.parameter.destination.bytes());
        auto& dst = memory[w.receiver][p.parameter.destination.name];
        auto& cnt = writes[w.receiver][p.parameter.destination.name];
        REQUIRE(w.destination_offset + w.bytes <= dst.size());
        for (std::uint64_t k = 0; k < w.bytes; ++k) {
          dst[w.destination_offset + k] = slot[p.staging_offset + w.staging_offset + k];
          ++cnt[w.destination_offset + k];
        }
      }
    }
    // Parameters never overlap in staging.
    CHECK(std::count_if(loaded.begin(), loaded.end(), [](int n) { return n > 1; }) == 0);
  }
  CHECK(planned == m.expected.size());
  CHECK(plan.total_bytes() == total);

  for (std::size_t r = 0; r < plan.receivers(); ++r) {
    const auto exposed = plan.receiver_parameters(r);
    REQUIRE(exposed.size() == m.expected.size());
    for (std::size_t i = 0; i < m.expected.size(); ++i) {
      const auto& lp = m.expected[i];
      INFO("receiver " << r << " parameter " << lp.destination);
      shape_t shape;
      const auto want = reference(m, lp, r % tp, tp, salt, shape);
      CHECK(exposed[i].name == lp.destination);
      CHECK(exposed[i].shape == shape);
      const auto& got = memory[r].at(lp.destination);
      const auto& cnt = writes[r].at(lp.destination);
      REQUIRE(got.size() == want.size());
      std::size_t wrong = 0, not_once = 0;
      for (std::size_t k = 0; k < got.size(); ++k) {
        wrong += got[k] != want[k];
        not_once += cnt[k] != 1;
      }
      CHECK(wrong == 0);
      CHECK(not_once == 0);
    }
  }
  check_senders(plan, m.id);
}

}  // namespace

TEST_CASE("transfer_plan: every receiver byte is written exactly once, from the right source element, "
          "by one or several senders") {
  for (std::uint32_t seed = 1; seed <= 12; ++seed) {
    std::mt19937 rng(seed);
    const random_model m = make_random_model(rng);
    const std::uint64_t budget = std::uniform_int_distribution<std::uint64_t>(64, 8192)(rng);
    const std::uint64_t alignment = std::uint64_t(1) << std::uniform_int_distribution<int>(0, 8)(rng);
    for (std::size_t tp : {1, 2, 4})
      for (std::size_t replicas : {1, 2})
        for (std::size_t senders : {1, 3}) {
          INFO("seed " << seed << " tp " << tp << " replicas " << replicas << " budget " << budget
                       << " alignment " << alignment << " senders " << senders);
          check_tiling(m, tp, replicas, budget, alignment, seed, senders);
        }
  }
}

// ---------------------------------------------------------------------------------------------
// Senders. A sender plan's writes, from the sender's compact staging image, must put into every
// receiver exactly the bytes the full plan does, and together every byte exactly once.

namespace {

// Receiver memory as tags (see tag()), and how often each byte was written.
struct receiver_memory {
  std::vector<std::map<std::string, std::vector<std::uint64_t>>> bytes;
  std::vector<std::map<std::string, std::vector<int>>> count;
};

receiver_memory blank_memory(const sl::transfer_plan& full) {
  receiver_memory m;
  m.bytes.resize(full.receivers());
  m.count.resize(full.receivers());
  for (std::size_t r = 0; r < full.receivers(); ++r)
    for (const auto& p : full.receiver_parameters(r)) {
      m.bytes[r][p.name].assign(p.bytes(), 0);
      m.count[r][p.name].assign(p.bytes(), 0);
    }
  return m;
}

// Loads every bucket of `plan` as a loader would (each shard's tags at its offset) and applies
// its writes to `memory`.
void apply(const sl::transfer_plan& plan, const std::map<std::string, std::size_t>& id, receiver_memory& memory) {
  for (const auto& b : plan.buckets()) {
    std::vector<std::uint64_t> slot(b.staging_bytes, 0);
    for (const auto& p : b.parameters) {
      for (const auto& s : p.parameter.shards) {
        REQUIRE(p.staging_offset + s.offset + s.tensor.bytes() <= slot.size());
        for (std::uint64_t k = 0; k < s.tensor.bytes(); ++k)
          slot[p.staging_offset + s.offset + k] = tag(id.at(s.tensor.name), k);
      }
      for (const auto& w : p.writes) {
        REQUIRE(w.staging_offset + w.bytes <= p.staging_bytes);
        auto& dst = memory.bytes.at(w.receiver).at(p.slice.name);
        auto& cnt = memory.count.at(w.receiver).at(p.slice.name);
        REQUIRE(w.destination_offset + w.bytes <= dst.size());
        for (std::uint64_t k = 0; k < w.bytes; ++k) {
          dst[w.destination_offset + k] = slot[p.staging_offset + w.staging_offset + k];
          ++cnt[w.destination_offset + k];
        }
      }
    }
  }
}

// Checks a sender plan's buckets, positions and compact staging images against its full plan.
void check_sender_plan(const sl::transfer_plan& plan, const sl::transfer_plan& sp, std::uint32_t s) {
  CHECK(sp.is_sender_plan());
  CHECK(sp.sender() == std::optional<std::size_t>(s));
  CHECK(sp.senders() == plan.senders());
  CHECK(sp.receivers() == plan.receivers());
  CHECK(sp.fingerprint() == plan.fingerprint());
  for (std::size_t r = 0; r < plan.receivers(); ++r) CHECK(sp.receiver_senders(r) == plan.receiver_senders(r));

  // Exactly the parameters of which s holds a shard, in plan order.
  std::vector<std::size_t> expected;
  for (std::size_t i = 0; i < plan.parameter_count(); ++i) {
    const auto& owners = plan.parameter(i).shard_senders;
    if (std::find(owners.begin(), owners.end(), s) != owners.end()) expected.push_back(i);
  }
  REQUIRE(sp.parameter_count() == expected.size());

  std::size_t position = 0;
  std::uint64_t total = 0, largest = 0;
  for (const auto& b : sp.buckets()) {
    REQUIRE(!b.parameters.empty());
    CHECK(b.first == position);
    CHECK((b.staging_bytes <= plan.bucket_bytes() || b.parameters.size() == 1));
    std::uint64_t end = 0;
    for (const auto& q : b.parameters) {
      const std::string& name = q.parameter.destination.name;
      INFO("sender " << s << " parameter " << name);
      CHECK(&sp.parameter(position) == &q);
      CHECK(sp.find(name) == &q);
      CHECK(sp.position(name) == std::optional<std::size_t>(position));
      REQUIRE(q.index == expected[position]);
      CHECK(q.staging_offset >= end);
      CHECK(q.staging_offset % plan.staging_alignment() == 0);
      const auto& full = plan.parameter(q.index);
      CHECK(q.parameter.destination == full.parameter.destination);
      CHECK(q.slice == full.slice);
      CHECK(q.split == full.split);
      // Its own shards only, packed back to back in index order.
      std::uint64_t at = 0;
      std::size_t own = 0;
      for (std::size_t k = 0; k < full.parameter.shards.size(); ++k) {
        if (full.shard_senders[k] != s) continue;
        REQUIRE(own < q.parameter.shards.size());
        CHECK(q.parameter.shards[own].index == full.parameter.shards[k].index);
        CHECK(q.parameter.shards[own].tensor == full.parameter.shards[k].tensor);
        CHECK(q.parameter.shards[own].offset == at);
        at += full.parameter.shards[k].tensor.bytes();
        ++own;
      }
      CHECK(own == q.parameter.shards.size());
      CHECK(q.staging_bytes == at);
      CHECK(q.shard_senders == std::vector<std::uint32_t>(own, s));
      // Its writes are the full plan's writes of s, moved into the compact image.
      std::vector<sl::planned_write> mine;
      for (const auto& w : full.writes)
        if (w.sender == s) mine.push_back(w);
      REQUIRE(q.writes.size() == mine.size());
      for (std::size_t i = 0; i < mine.size(); ++i) {
        const auto& w = q.writes[i];
        CHECK(w.sender == s);
        CHECK(w.shard == mine[i].shard);
        CHECK(w.receiver == mine[i].receiver);
        CHECK(w.destination_offset == mine[i].destination_offset);
        CHECK(w.bytes == mine[i].bytes);
        CHECK(w.staging_offset + w.bytes <= q.staging_bytes);
      }
      total += q.staging_bytes;
      end = q.staging_offset + q.staging_bytes;
      ++position;
    }
    CHECK(b.staging_bytes == end);
    largest = std::max(largest, b.staging_bytes);
  }
  CHECK(sp.max_staging_bytes() == largest);
  CHECK(sp.total_bytes() == total);
}

void check_senders(const sl::transfer_plan& plan, const std::map<std::string, std::size_t>& id) {
  REQUIRE(!plan.is_sender_plan());
  CHECK(!plan.sender());
  // Every write's bytes lie in shards of its sender, the first in shard `shard`; the quorum of
  // a receiver is the senders of its writes.
  std::vector<std::set<std::uint32_t>> quorum(plan.receivers());
  for (std::size_t i = 0; i < plan.parameter_count(); ++i) {
    const auto& p = plan.parameter(i);
    CHECK(p.index == i);
    REQUIRE(p.shard_senders.size() == p.parameter.shards.size());
    for (auto owner : p.shard_senders) CHECK(owner < plan.senders());
    const auto& shards = p.parameter.shards;
    for (const auto& w : p.writes) {
      quorum[w.receiver].insert(w.sender);
      std::size_t k = 0;
      while (k < shards.size() && shards[k].offset + shards[k].tensor.bytes() <= w.staging_offset) ++k;
      REQUIRE(k < shards.size());
      CHECK(shards[k].index == w.shard);
      for (; k < shards.size() && shards[k].offset < w.staging_offset + w.bytes; ++k)
        if (shards[k].tensor.bytes() > 0) CHECK(p.shard_senders[k] == w.sender);
    }
  }
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    CHECK(plan.receiver_senders(r) == std::vector<std::uint32_t>(quorum[r].begin(), quorum[r].end()));

  receiver_memory want = blank_memory(plan), got = blank_memory(plan);
  apply(plan, id, want);
  for (std::uint32_t s = 0; s < plan.senders(); ++s) {
    const auto sp = plan.for_sender(s);
    check_sender_plan(plan, sp, s);
    apply(sp, id, got);
  }
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    for (const auto& [name, bytes] : want.bytes[r]) {
      INFO("receiver " << r << " parameter " << name);
      CHECK(got.bytes[r].at(name) == bytes);
      const auto& cnt = got.count[r].at(name);
      CHECK(std::count(cnt.begin(), cnt.end(), 1) == static_cast<std::ptrdiff_t>(cnt.size()));
    }
}

// The model of the tests below, one layer or two, plus a tensor with no bytes.
std::vector<sl::parameter_descriptor> with_empty(int layers) {
  auto model = qwen(false, layers);
  model.push_back({"extra.empty", sl::dtype::bf16, {0, 4}});
  return model;
}

// Layer 0's k on sender 1, its v and the final norm on sender 2, the empty tensor on sender 3,
// everything else on sender 0.
std::vector<std::vector<std::string>> four_senders(const std::vector<sl::parameter_descriptor>& model) {
  std::vector<std::vector<std::string>> s(4);
  for (const auto& t : model) {
    if (t.name == "model.layers.0.self_attn.k_proj.weight") s[1].push_back(t.name);
    else if (t.name == "model.layers.0.self_attn.v_proj.weight" || t.name == "model.norm.weight") s[2].push_back(t.name);
    else if (t.name == "extra.empty") s[3].push_back(t.name);
    else s[0].push_back(t.name);
  }
  return s;
}

sl::plan_options sender_options(const std::vector<sl::parameter_descriptor>& model, std::size_t tp) {
  auto o = tp_options(tp);
  o.senders = 4;
  o.sender_tensors = four_senders(model);
  return o;
}

std::map<std::string, std::size_t> ids(const std::vector<sl::parameter_descriptor>& model) {
  std::map<std::string, std::size_t> id;
  for (std::size_t i = 0; i < model.size(); ++i) id[model[i].name] = i;
  return id;
}

// The error's code, and its message: `message`, then the code's text.
template <class F>
void check_message(F&& f, sl::errc code, const std::string& message) {
  try {
    f();
    FAIL("no error thrown, expected: " << message);
  } catch (const sl::error& e) {
    const std::string what = e.what();
    INFO("message: " << what);
    CHECK(e.code() == sl::make_error_code(code));
    CHECK(what.rfind(message, 0) == 0);
  }
}

const std::string qkv0 = "model.layers.0.self_attn.qkv_proj.weight";

}  // namespace

TEST_CASE("transfer_plan: q/k/v on three senders with tp 2: each sender stages only its shards, compactly") {
  const auto model = with_empty(2);
  const auto plan = build(model, sender_options(model, 2));
  CHECK(plan.senders() == 4);
  CHECK(!plan.is_sender_plan());
  const auto* full = plan.find(qkv0);
  REQUIRE(full != nullptr);
  CHECK(full->shard_senders == std::vector<std::uint32_t>{0, 1, 2});
  CHECK(full->staging_bytes == full->parameter.destination.bytes());

  const std::uint64_t row = hidden * 2, q = hidden * row, k = kv * row;
  const auto s1 = plan.for_sender(1);
  REQUIRE(s1.parameter_count() == 1);
  const auto& k_part = s1.parameter(0);
  CHECK(k_part.parameter.destination.name == qkv0);
  CHECK(k_part.index == full->index);
  REQUIRE(k_part.parameter.shards.size() == 1);
  CHECK(k_part.parameter.shards[0].index == 1);
  CHECK(k_part.parameter.shards[0].offset == 0);
  CHECK(k_part.staging_bytes == k);
  // receiver, staging (in the compact image), destination, bytes, sender, shard
  CHECK(k_part.writes == std::vector<sl::planned_write>{{0, 0, q / 2, k / 2, 1, 1}, {1, k / 2, q / 2, k / 2, 1, 1}});
  CHECK(s1.max_staging_bytes() == k);
  CHECK(s1.total_bytes() == k);
  CHECK(s1.receiver_parameters(0) == std::vector<sl::parameter_descriptor>{full->slice});
  // It holds nothing of the other parameters.
  CHECK(s1.find("model.norm.weight") == nullptr);
  CHECK(s1.find("model.layers.1.self_attn.qkv_proj.weight") == nullptr);

  const auto s2 = plan.for_sender(2);
  REQUIRE(s2.parameter_count() == 2);
  CHECK(s2.parameter(0).parameter.destination.name == qkv0);
  CHECK(s2.parameter(0).writes ==
        std::vector<sl::planned_write>{{0, 0, q / 2 + k / 2, k / 2, 2, 2}, {1, k / 2, q / 2 + k / 2, k / 2, 2, 2}});
  const auto& norm = s2.parameter(1);
  CHECK(norm.parameter.destination.name == "model.norm.weight");
  CHECK(norm.index == *plan.position("model.norm.weight"));
  CHECK(norm.staging_offset == 256);  // after v's 256 bytes, aligned
  CHECK(norm.writes == std::vector<sl::planned_write>{{0, 0, 0, hidden * 2, 2, 0}, {1, 0, 0, hidden * 2, 2, 0}});
  CHECK(s2.max_staging_bytes() == 256 + hidden * 2);
  CHECK(s2.total_bytes() == k + hidden * 2);

  // Sender 0 has a part of every parameter but the ones of senders 2 and 3 alone.
  const auto s0 = plan.for_sender(0);
  CHECK(s0.parameter_count() == plan.parameter_count() - 2);
  CHECK(s0.find(qkv0)->parameter.shards.size() == 1);
  CHECK(s0.find(qkv0)->staging_bytes == q);

  // Sender 3 holds a tensor with no bytes: it plans the parameter, writes nothing, and no
  // receiver waits for it.
  const auto s3 = plan.for_sender(3);
  REQUIRE(s3.parameter_count() == 1);
  CHECK(s3.parameter(0).writes.empty());
  CHECK(s3.max_staging_bytes() == 0);
  for (std::size_t r = 0; r < plan.receivers(); ++r)
    CHECK(plan.receiver_senders(r) == std::vector<std::uint32_t>{0, 1, 2});

  // A sender plan of a sender plan is the same plan.
  const auto again = s2.for_sender(2);
  REQUIRE(again.parameter_count() == s2.parameter_count());
  for (std::size_t i = 0; i < s2.parameter_count(); ++i) {
    CHECK(again.parameter(i).writes == s2.parameter(i).writes);
    CHECK(again.parameter(i).staging_offset == s2.parameter(i).staging_offset);
  }
  CHECK(s2.for_sender(1).parameter_count() == 0);

  check_senders(plan, ids(model));
}

TEST_CASE("transfer_plan: a write is split where the sender changes, and stays whole across one sender's shards") {
  const auto model = with_empty(2);
  const auto plan = build(model, sender_options(model, 1));
  const std::uint64_t row = hidden * 2, q = hidden * row, k = kv * row;
  CHECK(plan.find(qkv0)->writes == std::vector<sl::planned_write>{{0, 0, 0, q, 0, 0},
                                                                   {0, q, q, k, 1, 1},
                                                                   {0, q + k, q + k, k, 2, 2}});
  // Layer 1's q, k and v are all on sender 0: one write, as with one sender.
  const auto* qkv1 = plan.find("model.layers.1.self_attn.qkv_proj.weight");
  REQUIRE(qkv1 != nullptr);
  CHECK(qkv1->writes == std::vector<sl::planned_write>{{0, 0, 0, q + 2 * k, 0, 0}});
  // The same owners through sender_of give the same plan.
  auto o = tp_options(1);
  o.senders = 4;
  const auto lists = four_senders(model);
  o.sender_of = [&lists](const sl::parameter_descriptor& t) {
    for (std::size_t s = 0; s < lists.size(); ++s)
      if (std::find(lists[s].begin(), lists[s].end(), t.name) != lists[s].end()) return s;
    return std::size_t{99};
  };
  const auto same = build(model, o);
  CHECK(same.fingerprint() == plan.fingerprint());
  for (std::size_t i = 0; i < plan.parameter_count(); ++i) CHECK(same.parameter(i).writes == plan.parameter(i).writes);
  check_senders(plan, ids(model));
}

TEST_CASE("transfer_plan: with one sender every write is sender 0's and the sender plan is the whole plan") {
  const auto model = qwen(true);
  const auto plan = build(model, tp_options(2, 2));
  CHECK(plan.senders() == 1);
  for (std::size_t i = 0; i < plan.parameter_count(); ++i)
    for (const auto& w : plan.parameter(i).writes) CHECK(w.sender == 0);
  const auto only = plan.for_sender(0);
  CHECK(only.sender() == std::optional<std::size_t>(0));
  REQUIRE(only.parameter_count() == plan.parameter_count());
  for (std::size_t i = 0; i < plan.parameter_count(); ++i) {
    CHECK(only.parameter(i).writes == plan.parameter(i).writes);
    CHECK(only.parameter(i).staging_offset == plan.parameter(i).staging_offset);
  }
  CHECK(only.max_staging_bytes() == plan.max_staging_bytes());
  for (std::size_t r = 0; r < plan.receivers(); ++r) CHECK(plan.receiver_senders(r) == std::vector<std::uint32_t>{0});
}

TEST_CASE("transfer_plan: parameters have a global index, a position and a lookup by name") {
  const auto model = qwen(true);
  const auto plan = build(model, tp_options(2));
  const auto fused = sl::shard_map::standard().fuse(model);
  REQUIRE(plan.parameter_count() == fused.size());
  for (std::size_t i = 0; i < fused.size(); ++i) {
    const std::string& name = fused[i].destination.name;
    CHECK(plan.parameter(i).index == i);
    CHECK(plan.parameter(i).parameter.destination.name == name);
    CHECK(plan.position(name) == std::optional<std::size_t>(i));
    CHECK(plan.find(name) == &plan.parameter(i));
  }
  std::size_t first = 0;
  for (const auto& b : plan.buckets()) {
    CHECK(b.first == first);
    first += b.parameters.size();
  }
  CHECK(!plan.position("model.layers.0.self_attn.q_proj.weight"));
  CHECK(!plan.position(""));
  check_message([&] { (void)plan.parameter(fused.size()); }, sl::errc::invalid_argument,
                "transfer_plan: parameter position " + std::to_string(fused.size()) +
                    " does not exist (the plan has " + std::to_string(fused.size()) + " parameters)");
  // A copy looks up in its own parameters.
  const sl::transfer_plan copy = plan;
  CHECK(copy.find(qkv0) == &copy.parameter(*plan.position(qkv0)));

  const sl::transfer_plan none;
  CHECK(none.parameter_count() == 0);
  CHECK(none.find(qkv0) == nullptr);
  CHECK(none.receiver_senders(0).empty());
  CHECK(none.fingerprint() == build({}).fingerprint());
}

TEST_CASE("transfer_plan: the fingerprint covers layout, split and owners, not bucketing") {
  const auto model = with_empty(1);
  const auto base = build(model, sender_options(model, 2));
  CHECK(build(model, sender_options(model, 2)).fingerprint() == base.fingerprint());
  for (std::size_t s = 0; s < base.senders(); ++s) CHECK(base.for_sender(s).fingerprint() == base.fingerprint());
  auto o = sender_options(model, 2);
  o.bucket_bytes = 1024;
  o.staging_alignment = 16;
  CHECK(build(model, o).fingerprint() == base.fingerprint());

  std::vector<std::pair<std::string, std::uint64_t>> variants{{"base", base.fingerprint()}};
  auto other = model;
  other[0].type = sl::dtype::f16;  // the embedding's dtype
  variants.push_back({"dtype", build(other, sender_options(other, 2)).fingerprint()});
  other = model;
  other[0].shape = {64, hidden};  // the embedding's shape
  variants.push_back({"shape", build(other, sender_options(other, 2)).fingerprint()});
  o = sender_options(model, 2);
  std::swap(o.sender_tensors[1], o.sender_tensors[2]);  // another owner for k, v and the norm
  variants.push_back({"owner", build(model, o).fingerprint()});
  variants.push_back({"tp", build(model, sender_options(model, 1)).fingerprint()});
  o = sender_options(model, 2);
  o.replicas = 2;
  variants.push_back({"replicas", build(model, o).fingerprint()});
  o = sender_options(model, 2);
  o.senders = 5;
  o.sender_tensors.emplace_back();
  variants.push_back({"senders", build(model, o).fingerprint()});
  o = sender_options(model, 2);
  o.split = [](const sl::parameter_descriptor&) { return sl::tp_split::replicate; };
  variants.push_back({"split", build(model, o).fingerprint()});
  for (std::size_t i = 0; i < variants.size(); ++i)
    for (std::size_t j = 0; j < i; ++j) {
      INFO(variants[i].first << " vs " << variants[j].first);
      CHECK(variants[i].second != variants[j].second);
    }
}

TEST_CASE("transfer_plan: sender options and sender indices are checked, errors name the tensor") {
  const auto model = with_empty(1);
  auto o = sender_options(model, 2);
  o.senders = 0;
  o.sender_tensors.clear();
  check_message([&] { build(model, o); }, sl::errc::invalid_argument,
                "transfer_plan: plan_options.senders is 0, it must be at least 1");

  o = sender_options(model, 2);
  o.sender_of = [](const sl::parameter_descriptor&) { return std::size_t{0}; };
  check_message([&] { build(model, o); }, sl::errc::invalid_argument,
                "transfer_plan: plan_options.sender_of and plan_options.sender_tensors are both given, give one");

  o = sender_options(model, 2);
  o.sender_tensors.pop_back();
  check_message([&] { build(model, o); }, sl::errc::invalid_argument,
                "transfer_plan: plan_options.sender_tensors has 3 entries, plan_options.senders is 4");

  const std::string k0 = "model.layers.0.self_attn.k_proj.weight";
  o = sender_options(model, 2);
  o.sender_tensors[3].push_back(k0);
  check_message([&] { build(model, o); }, sl::errc::invalid_argument,
                "transfer_plan: source tensor '" + k0 + "' is claimed by senders 1 and 3");
  try {
    build(model, o);
  } catch (const sl::error& e) {
    const std::string what = e.what();
    CHECK(what.find(k0) == what.rfind(k0));  // named once
  }

  o = sender_options(model, 2);
  o.sender_tensors[2].push_back("model.norm.weight");
  check_message([&] { build(model, o); }, sl::errc::invalid_argument,
                "transfer_plan: source tensor 'model.norm.weight' is listed twice by sender 2");

  o = sender_options(model, 2);
  std::erase(o.sender_tensors[2], "model.norm.weight");
  check_message([&] { build(model, o); }, sl::errc::invalid_argument,
                "transfer_plan: source tensor 'model.norm.weight' is held by no sender "
                "(plan_options.sender_tensors lists it for none of the 4 senders)");

  o = sender_options(model, 2);
  o.sender_tensors[2].push_back("model.layers.9.mlp.up_proj.weight");
  check_message([&] { build(model, o); }, sl::errc::unknown_parameter,
                "transfer_plan: plan_options.sender_tensors[2] names 'model.layers.9.mlp.up_proj.weight', "
                "which is no source tensor");

  o = tp_options(2);
  o.senders = 4;
  o.sender_of = [](const sl::parameter_descriptor& t) { return t.name == "model.norm.weight" ? 7 : 0; };
  check_message([&] { build(model, o); }, sl::errc::invalid_argument,
                "transfer_plan: source tensor 'model.norm.weight': sender_of gave sender 7, the plan has 4 senders");

  const auto plan = build(model, sender_options(model, 2));
  check_message([&] { plan.for_sender(5); }, sl::errc::invalid_argument,
                "transfer_plan: sender 5 does not exist (the plan has 4 senders)");
  check_message([&] { plan.for_sender(1).for_sender(4); }, sl::errc::invalid_argument,
                "transfer_plan: sender 4 does not exist (the plan has 4 senders)");
  check_message([&] { (void)plan.receiver_senders(2); }, sl::errc::invalid_argument,
                "transfer_plan: receiver 2 does not exist (the plan has 2 receivers)");
}

TEST_CASE("transfer_plan: a model of 100 000 tensors builds, indexes and splits among senders") {
  // MoE layers with 64 experts and a dense layer every fourth, in Hugging Face naming.
  std::vector<sl::parameter_descriptor> model;
  std::size_t destinations = 0;
  auto add = [&model](std::string name, shape_t shape) {
    model.push_back({std::move(name), sl::dtype::bf16, std::move(shape)});
  };
  for (int l = 0; model.size() < 100000; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {8});
    add(p + "self_attn.q_proj.weight", {8, 8});
    add(p + "self_attn.k_proj.weight", {4, 8});
    add(p + "self_attn.v_proj.weight", {4, 8});
    add(p + "self_attn.o_proj.weight", {8, 8});
    add(p + "post_attention_layernorm.weight", {8});
    destinations += 4;
    if (l % 4 == 3) {
      add(p + "mlp.gate_proj.weight", {16, 8});
      add(p + "mlp.up_proj.weight", {16, 8});
      add(p + "mlp.down_proj.weight", {8, 16});
      destinations += 2;
    } else {
      add(p + "mlp.gate.weight", {64, 8});
      for (int e = 0; e < 64; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        add(x + "gate_proj.weight", {4, 8});
        add(x + "up_proj.weight", {4, 8});
        add(x + "down_proj.weight", {8, 4});
      }
      destinations += 3;
    }
  }
  auto o = tp_options(2);
  o.senders = 4;
  o.sender_of = [](const sl::parameter_descriptor& t) { return std::hash<std::string>{}(t.name) % 4; };
  const auto plan = build(model, o);
  REQUIRE(plan.parameter_count() == destinations);
  std::size_t writes = 0;
  for (std::size_t i = 0; i < plan.parameter_count(); ++i) {
    const auto& p = plan.parameter(i);
    CHECK(p.index == i);
    CHECK(plan.position(p.parameter.destination.name) == std::optional<std::size_t>(i));
    writes += p.writes.size();
  }
  CHECK(plan.find("model.layers.2.mlp.experts.w13_weight")->parameter.shards.size() == 128);
  std::size_t sender_writes = 0, sender_shards = 0;
  for (std::size_t s = 0; s < plan.senders(); ++s) {
    const auto sp = plan.for_sender(s);
    CHECK(sp.fingerprint() == plan.fingerprint());
    for (std::size_t i = 0; i < sp.parameter_count(); ++i) {
      sender_writes += sp.parameter(i).writes.size();
      sender_shards += sp.parameter(i).parameter.shards.size();
    }
  }
  CHECK(sender_writes == writes);
  CHECK(sender_shards == model.size());
}
