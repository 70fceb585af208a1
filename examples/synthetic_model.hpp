// A synthetic Qwen-style model for the demo and the benchmarks: its tensor list in the
// Hugging Face naming the shard map understands, and deterministic float32 master weights.
#pragma once

#include <shardline/plan/convert.hpp>
#include <shardline/plan/parameter.hpp>

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace shardline::examples {

struct model_config {
  std::int64_t hidden = 2048;
  std::int64_t intermediate = 5632;
  std::int64_t kv_dim = 512;  // grouped-query attention: k and v are narrower than q
  std::int64_t vocab = 32000;
  std::int64_t layers = 10;
  std::int64_t experts = 0;  // > 0: MoE MLP with this many experts of intermediate/4 each

  /// The default shape, with its layer count chosen so the bf16 model is close to `bytes`.
  static model_config of_size(std::uint64_t bytes, std::int64_t experts = 0) {
    return of_size(bytes, experts, model_config{});
  }

  /// `base` with its layer count chosen so the bf16 model is close to `bytes`.
  static model_config of_size(std::uint64_t bytes, std::int64_t experts, model_config base) {
    model_config c = base;
    c.experts = experts;
    c.layers = 1;
    const std::uint64_t fixed = c.total_bytes() - c.layer_bytes();
    c.layers = bytes > fixed ? std::max<std::int64_t>(1, (bytes - fixed) / c.layer_bytes()) : 1;
    return c;
  }

  std::vector<parameter_descriptor> tensors() const {
    std::vector<parameter_descriptor> t;
    auto add = [&t](std::string name, std::vector<std::int64_t> shape) {
      t.push_back({std::move(name), dtype::bf16, std::move(shape)});
    };
    add("model.embed_tokens.weight", {vocab, hidden});
    for (std::int64_t l = 0; l < layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      add(p + "input_layernorm.weight", {hidden});
      add(p + "self_attn.q_proj.weight", {hidden, hidden});
      add(p + "self_attn.k_proj.weight", {kv_dim, hidden});
      add(p + "self_attn.v_proj.weight", {kv_dim, hidden});
      add(p + "self_attn.o_proj.weight", {hidden, hidden});
      add(p + "post_attention_layernorm.weight", {hidden});
      if (experts == 0) {
        add(p + "mlp.gate_proj.weight", {intermediate, hidden});
        add(p + "mlp.up_proj.weight", {intermediate, hidden});
        add(p + "mlp.down_proj.weight", {hidden, intermediate});
      } else {
        const std::int64_t ie = intermediate / 4;
        for (std::int64_t e = 0; e < experts; ++e) {
          const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
          add(x + "gate_proj.weight", {ie, hidden});
          add(x + "up_proj.weight", {ie, hidden});
          add(x + "down_proj.weight", {hidden, ie});
        }
      }
    }
    add("model.norm.weight", {hidden});
    return t;
  }

  std::uint64_t total_bytes() const {
    std::uint64_t n = 0;
    for (const auto& t : tensors()) n += t.bytes();
    return n;
  }
  std::uint64_t layer_bytes() const {
    model_config one = *this;
    one.layers = 1;
    model_config none = *this;
    none.layers = 0;
    return one.total_bytes() - none.total_bytes();
  }
};

/// The value of element `i` of a tensor in weight version `version`: what the trainer
/// holds in float32 and what the receiver must find, converted, after the update.
inline std::uint64_t tensor_seed(const std::string& tensor, std::uint32_t version) {
  std::uint64_t h = 1469598103934665603ull ^ version;
  for (unsigned char c : tensor) h = (h ^ c) * 1099511628211ull;
  return h;
}

inline float master_value(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t x = seed + i * 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 31)) * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return (static_cast<float>(x >> 40) / static_cast<float>(1 << 24) - 0.5f) * 0.04f;
}

inline void fill_master(const std::string& tensor, std::uint32_t version, std::span<float> out) {
  const std::uint64_t seed = tensor_seed(tensor, version);
  for (std::uint64_t i = 0; i < out.size(); ++i) out[i] = master_value(seed, i);
}

/// A 64-bit checksum over whole words (FNV-style mix), fast enough for GiBs.
inline std::uint64_t checksum(std::span<const std::byte> bytes) {
  std::uint64_t h = 1469598103934665603ull;
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h = (h ^ w) * 1099511628211ull;
    h ^= h >> 32;
  }
  for (; i < bytes.size(); ++i) h = (h ^ std::to_integer<std::uint64_t>(bytes[i])) * 1099511628211ull;
  return h;
}

/// "64M", "1G", "4096": a byte count for command lines. Throws std::invalid_argument.
inline std::uint64_t parse_bytes(const std::string& text) {
  std::size_t used = 0;
  const double value = std::stod(text, &used);
  const std::string unit = text.substr(used);
  const double scale = unit.empty() ? 1 : unit == "K" ? 1 << 10 : unit == "M" ? 1 << 20
                                        : unit == "G" ? 1 << 30 : -1;
  if (scale < 0 || value <= 0)
    throw std::invalid_argument("bad byte count '" + text + "' (use e.g. 64M)");
  return static_cast<std::uint64_t>(value * scale);
}

}  // namespace shardline::examples
