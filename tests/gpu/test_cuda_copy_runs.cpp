// cuda::detail::plan_copies: a write batch's pieces as 1-D and 2-D copies (no GPU), and the
// CUDA IPC transport writing column-split rows as strided copies on a GPU (suite "gpu"):
// every byte of the receiver's memory checked, the rows and gaps it must not touch included.
#include <shardline/cuda/detail/copy_runs.hpp>

#include <shardline/cuda/device.hpp>
#include <shardline/cuda/device_buffer.hpp>
#include <shardline/cuda/error.hpp>
#include <shardline/cuda/ipc_transport.hpp>
#include <shardline/cuda/pinned_buffer.hpp>

#include <asio/io_context.hpp>

#include <doctest/doctest.h>

#include "gpu_support.hpp"

#include <unistd.h>

#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace sl = shardline;
namespace cuda = shardline::cuda;
namespace cd = shardline::cuda::detail;

namespace {

// Pieces over fake addresses: destination base 1 << 40, source base 1 << 41.
constexpr std::uintptr_t dst0 = std::uintptr_t(1) << 40, src0 = std::uintptr_t(1) << 41;

cd::copy_piece piece(std::uint64_t dst, std::uint64_t src, std::size_t size, std::uint32_t dblock = 0,
                     std::uint32_t sblock = 0) {
  return {dst0 + dst, src0 + src, size, dblock, sblock};
}

// The column split of a [rows, row_bytes] parameter for rank r of tp: one piece per row.
std::vector<cd::copy_piece> column_rows(std::size_t rows, std::size_t row_bytes, std::size_t tp, std::size_t r) {
  std::vector<cd::copy_piece> v;
  const std::size_t mine = row_bytes / tp;
  for (std::size_t i = 0; i < rows; ++i) v.push_back(piece(i * mine, i * row_bytes + r * mine, mine));
  return v;
}

std::vector<cd::planned_copy> plan(const std::vector<cd::copy_piece>& p) { return cd::plan_copies(p); }

// Applies `copies` (their 2-D meaning) and, separately, `pieces` one by one to byte images of
// the destination, sources read from `src` (offsets from src0), destination offsets from dst0:
// both images must agree, and every destination byte be written as often by either.
void check_same_effect(const std::vector<cd::copy_piece>& pieces, const std::vector<cd::planned_copy>& copies,
                       std::size_t dst_bytes, const std::vector<std::uint8_t>& src) {
  std::vector<std::uint8_t> by_pieces(dst_bytes, 0xee), by_copies(dst_bytes, 0xee);
  std::vector<int> writes_pieces(dst_bytes), writes_copies(dst_bytes);
  for (const auto& p : pieces)
    for (std::size_t k = 0; k < p.size; ++k) {
      by_pieces[p.destination - dst0 + k] = src[p.source - src0 + k];
      ++writes_pieces[p.destination - dst0 + k];
    }
  for (const auto& c : copies) {
    REQUIRE(c.width <= c.destination_pitch);
    REQUIRE(c.width <= c.source_pitch);
    for (std::size_t row = 0; row < c.height; ++row)
      for (std::size_t k = 0; k < c.width; ++k) {
        const std::size_t d = c.destination - dst0 + row * c.destination_pitch + k;
        by_copies[d] = src[c.source - src0 + row * c.source_pitch + k];
        ++writes_copies[d];
      }
  }
  CHECK(by_copies == by_pieces);
  CHECK(writes_copies == writes_pieces);
  // The copies name the pieces they carry, in order, each once.
  std::size_t next = 0;
  for (const auto& c : copies) {
    while (next < pieces.size() && pieces[next].size == 0) ++next;
    CHECK(c.first == next);
    next = c.first + c.pieces;
  }
  while (next < pieces.size() && pieces[next].size == 0) ++next;
  CHECK(next == pieces.size());
}

}  // namespace

TEST_CASE("cuda copy runs: a column split's rows become one 2-D copy, pitches the two strides") {
  for (std::size_t r = 0; r < 2; ++r) {
    const auto pieces = column_rows(4096, 8192, 2, r);
    const auto copies = plan(pieces);
    REQUIRE(copies.size() == 1);
    const auto& c = copies[0];
    CHECK(c.is_2d());
    CHECK(c.destination == dst0);
    CHECK(c.source == src0 + r * 4096);
    CHECK(c.width == 4096);
    CHECK(c.height == 4096);
    CHECK(c.destination_pitch == 4096);
    CHECK(c.source_pitch == 8192);
    CHECK(c.first == 0);
    CHECK(c.pieces == 4096);
    CHECK(c.source_end() == src0 + 4095 * 8192 + r * 4096 + 4096);
    CHECK(c.destination_end() == dst0 + 4096 * 4096);
  }
}

TEST_CASE("cuda copy runs: one piece is one 1-D copy; none is no copy") {
  const std::vector p{piece(16, 32, 100)};
  const auto copies = plan(p);
  REQUIRE(copies.size() == 1);
  CHECK_FALSE(copies[0].is_2d());
  CHECK(copies[0].destination == dst0 + 16);
  CHECK(copies[0].source == src0 + 32);
  CHECK(copies[0].width == 100);
  CHECK(plan({}).empty());
  CHECK(plan({piece(0, 0, 0)}).empty());
}

TEST_CASE("cuda copy runs: pieces that continue each other on both sides become one 1-D copy, of any lengths") {
  const std::vector p{piece(0, 1000, 10), piece(10, 1010, 30), piece(40, 1040, 5)};
  const auto copies = plan(p);
  REQUIRE(copies.size() == 1);
  CHECK_FALSE(copies[0].is_2d());
  CHECK(copies[0].width == 45);
  CHECK(copies[0].pieces == 3);
}

TEST_CASE("cuda copy runs: a run ends at a change of length, stride, destination block or source block") {
  SUBCASE("length") {
    const std::vector p{piece(0, 0, 8), piece(8, 16, 8), piece(16, 32, 8), piece(24, 48, 7)};
    const auto c = plan(p);
    REQUIRE(c.size() == 2);
    CHECK(c[0].height == 3);
    CHECK_FALSE(c[1].is_2d());
    CHECK(c[1].first == 3);
  }
  SUBCASE("stride: two runs") {
    const std::vector p{piece(0, 0, 8), piece(8, 16, 8), piece(16, 32, 8), piece(100, 200, 8), piece(120, 300, 8),
                        piece(140, 400, 8)};
    const auto c = plan(p);
    REQUIRE(c.size() == 2);
    CHECK(c[0].height == 3);
    CHECK(c[0].source_pitch == 16);
    CHECK(c[1].height == 3);
    CHECK(c[1].first == 3);
    CHECK(c[1].destination_pitch == 20);
    CHECK(c[1].source_pitch == 100);
  }
  SUBCASE("destination block") {
    const std::vector p{piece(0, 0, 8, 0), piece(8, 16, 8, 0), piece(16, 32, 8, 1), piece(24, 48, 8, 1)};
    const auto c = plan(p);
    REQUIRE(c.size() == 2);
    CHECK(c[0].height == 2);
    CHECK(c[1].height == 2);
    CHECK(c[1].first == 2);
  }
  SUBCASE("source block") {
    const std::vector p{piece(0, 0, 8, 0, 5), piece(8, 16, 8, 0, 5), piece(16, 32, 8, 0, 6)};
    const auto c = plan(p);
    REQUIRE(c.size() == 2);
    CHECK(c[0].height == 2);
    CHECK_FALSE(c[1].is_2d());
  }
  SUBCASE("contiguous pieces in two destination blocks") {
    const std::vector p{piece(0, 0, 8, 0), piece(8, 8, 8, 1)};
    CHECK(plan(p).size() == 2);
  }
}

TEST_CASE("cuda copy runs: overlapping rows, falling addresses and pitches past the limit stay 1-D") {
  SUBCASE("destination rows overlap") {
    const std::vector p{piece(0, 0, 16), piece(8, 32, 16), piece(16, 64, 16)};
    CHECK(plan(p).size() == 3);
  }
  SUBCASE("source rows overlap") {
    const std::vector p{piece(0, 0, 16), piece(32, 8, 16), piece(64, 16, 16)};
    CHECK(plan(p).size() == 3);
  }
  SUBCASE("falling destination") {
    const std::vector p{piece(64, 0, 16), piece(32, 32, 16), piece(0, 64, 16)};
    CHECK(plan(p).size() == 3);
  }
  SUBCASE("falling source") {
    const std::vector p{piece(0, 64, 16), piece(32, 32, 16), piece(64, 0, 16)};
    CHECK(plan(p).size() == 3);
  }
  SUBCASE("pitch past max_pitch") {
    const std::vector p{piece(0, 0, 16), piece(16, 4096, 16), piece(32, 8192, 16)};
    CHECK(cd::plan_copies(p, cd::any_span{}, 4095).size() == 3);
    CHECK(cd::plan_copies(p, cd::any_span{}, 4096).size() == 1);
    const std::vector far{piece(0, 0, 16), piece(16, cd::max_copy_pitch + 1, 16)};
    CHECK(plan(far).size() == 2);
  }
}

TEST_CASE("cuda copy runs: a merged copy the caller refuses falls back to a copy per piece") {
  const auto pieces = column_rows(5, 64, 2, 1);
  std::size_t asked = 0;
  const auto copies = cd::plan_copies(pieces, [&](const cd::planned_copy& c) {
    ++asked;
    CHECK(c.pieces == 5);
    return false;
  });
  CHECK(asked == 1);
  REQUIRE(copies.size() == 5);
  for (std::size_t i = 0; i < 5; ++i) {
    CHECK_FALSE(copies[i].is_2d());
    CHECK(copies[i].first == i);
    CHECK(copies[i].source == pieces[i].source);
    CHECK(copies[i].destination == pieces[i].destination);
    CHECK(copies[i].width == 32);
  }
  // A single piece is never put to the caller.
  asked = 0;
  (void)cd::plan_copies(std::vector{piece(0, 0, 8)}, [&](const cd::planned_copy&) {
    ++asked;
    return false;
  });
  CHECK(asked == 0);
}

TEST_CASE("cuda copy runs: random batches: the copies write what the pieces write, every byte as often") {
  std::mt19937_64 rng(20261130);
  for (int round = 0; round < 300; ++round) {
    std::vector<cd::copy_piece> pieces;
    std::uint64_t dst = 0, src = 0;
    const int runs = 1 + static_cast<int>(rng() % 6);
    for (int k = 0; k < runs; ++k) {
      const std::size_t width = 1 + rng() % 40;
      const std::size_t height = 1 + rng() % 12;
      const std::size_t dpitch = width + (rng() % 3 == 0 ? 0 : rng() % 50);
      const std::size_t spitch = width + (rng() % 3 == 0 ? 0 : rng() % 50);
      const std::uint32_t dblock = static_cast<std::uint32_t>(rng() % 2);
      for (std::size_t i = 0; i < height; ++i) {
        std::size_t w = width;
        if (rng() % 17 == 0) w = rng() % (width + 1);  // a length change, sometimes empty
        pieces.push_back(piece(dst + i * dpitch, src + i * spitch, w, dblock));
      }
      dst += height * dpitch + rng() % 64;
      src += height * spitch + rng() % 64;
    }
    std::vector<std::uint8_t> bytes(src + 64);
    for (auto& b : bytes) b = static_cast<std::uint8_t>(rng());
    const auto copies = plan(pieces);
    CHECK(copies.size() <= pieces.size());
    check_same_effect(pieces, copies, dst + 64, bytes);
  }
}

// ---- on a GPU: the transport writes column-split rows as strided copies ------------------

namespace {

void check(cudaError_t e, const char* what) { cuda::throw_if(e, what); }

std::string copy_runs_socket(const std::string& what) {
  return "/tmp/shardline-copyruns-" + std::to_string(::getpid()) + "-" + what + ".sock";
}

std::error_code wait_write(asio::io_context& io, cuda::ipc_transport::connection& conn,
                           const std::vector<sl::write_request>& batch) {
  std::optional<std::error_code> got;
  conn.async_write(batch, [&](std::error_code ec) { got = ec; });
  gpu_test::run_until(io, [&] { return got.has_value(); });
  return got.value_or(std::make_error_code(std::errc::timed_out));
}

std::uint8_t pattern(std::size_t i, unsigned seed) { return static_cast<std::uint8_t>((i * 167 + seed * 41 + 7) & 0xff); }

}  // namespace

TEST_SUITE_BEGIN("gpu");

TEST_CASE("cuda copy runs: a source span counts as one allocation within one cudaMalloc block, or pinned memory") {
  cuda::device_buffer a(1 << 20, 0), b(1 << 20, 0);
  cuda::pinned_buffer h(1 << 20, 0), g(1 << 20, 0);
  const auto at = [](const auto& buf, std::size_t k) { return reinterpret_cast<std::uintptr_t>(buf.data()) + k; };
  CHECK(cd::one_source_allocation(at(a, 0), at(a, (1 << 20) - 1)));
  CHECK(cd::one_source_allocation(at(a, 4096), at(a, 8191)));
  CHECK_FALSE(cd::one_source_allocation(at(a, 0), at(b, 0)));
  CHECK_FALSE(cd::one_source_allocation(at(a, 0), at(h, 0)));
  CHECK(cd::one_source_allocation(at(h, 0), at(h, (1 << 20) - 1)));
  // Two pinned blocks: told apart only where the driver gives pinned memory's ranges.
  MESSAGE("two pinned blocks taken as one allocation: " << cd::one_source_allocation(at(h, 0), at(g, 0)));
  std::vector<std::byte> pageable(64);
  CHECK_FALSE(cd::one_source_allocation(reinterpret_cast<std::uintptr_t>(pageable.data()),
                                        reinterpret_cast<std::uintptr_t>(pageable.data()) + 63));
}

TEST_CASE("cuda copy runs: column-split and strided rows over the IPC transport land, every other byte untouched") {
  // The receiver (in this process: its pointers used in place) holds, in one cudaMalloc block
  // poisoned with 0xa5: rank 0's and rank 1's column slices of a [rows, row_bytes] parameter,
  // then a matrix of which only every other row, and only part of it, is exposed and written.
  constexpr std::size_t rows = 1024, row_bytes = 2048, mine = row_bytes / 2;
  constexpr std::size_t guard = 4096, slice = rows * mine;
  constexpr std::size_t mrows = 300, mpitch = 1536, mwidth = 1000, moffset = 200;
  const std::size_t total = guard + 2 * slice + guard + mrows * mpitch + guard;
  asio::io_context io;
  cuda::device_buffer engine(total, 0);
  const auto poison = std::byte{0xa5};
  check(cudaMemset(engine.data(), 0xa5, total), "cudaMemset");
  cuda::ipc_transport::receiver rx(io.get_executor(), copy_runs_socket("strided"));
  std::byte* slice_at[2] = {engine.data() + guard, engine.data() + guard + slice};
  std::byte* matrix = engine.data() + guard + 2 * slice + guard;
  rx.expose({"o_proj.rank0", std::span(slice_at[0], slice), sl::memory_location::cuda(0), std::nullopt});
  rx.expose({"o_proj.rank1", std::span(slice_at[1], slice), sl::memory_location::cuda(0), std::nullopt});
  for (std::size_t i = 0; i < mrows; i += 2)
    rx.expose({"m." + std::to_string(i), std::span(matrix + i * mpitch + moffset, mwidth), sl::memory_location::cuda(0),
               std::nullopt});

  cuda::ipc_transport transport(io.get_executor());
  std::optional<std::error_code> accepted, connected;
  cuda::ipc_transport::connection conn;
  rx.async_accept([&](std::error_code ec, std::uint32_t) { accepted = ec; });
  transport.async_connect(copy_runs_socket("strided"), {0, 0}, [&](std::error_code ec, cuda::ipc_transport::connection c) {
    connected = ec;
    conn = std::move(c);
  });
  gpu_test::run_until(io, [&] { return accepted && connected; });
  REQUIRE(*connected == std::error_code{});

  // Sources: the whole parameter on the device; the matrix rows from pinned host memory, at
  // a pitch of their own.
  constexpr std::size_t spitch = 1100;
  std::vector<std::uint8_t> parameter(rows * row_bytes), host_rows(mrows * spitch);
  for (std::size_t i = 0; i < parameter.size(); ++i) parameter[i] = pattern(i, 1);
  for (std::size_t i = 0; i < host_rows.size(); ++i) host_rows[i] = pattern(i, 2);
  cuda::device_buffer dsrc(parameter.size(), 0);
  check(cudaMemcpy(dsrc.data(), parameter.data(), parameter.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
  cuda::pinned_buffer psrc(host_rows.size(), 0);
  std::memcpy(psrc.data(), host_rows.data(), host_rows.size());
  auto dreg = transport.register_memory(dsrc.bytes(), sl::memory_location::cuda(0));
  auto preg = transport.register_memory(psrc.bytes(), sl::memory_location::host_pinned());

  std::vector<sl::write_request> batch;
  for (std::size_t r = 0; r < 2; ++r) {
    const auto* region = conn.remote_regions().find("o_proj.rank" + std::to_string(r));
    REQUIRE(region);
    for (std::size_t i = 0; i < rows; ++i)
      batch.push_back(sl::make_write(dreg.region(), dsrc.bytes().subspan(i * row_bytes + r * mine, mine), *region, i * mine));
  }
  for (std::size_t i = 0; i < mrows; i += 2) {
    const auto* region = conn.remote_regions().find("m." + std::to_string(i));
    REQUIRE(region);
    batch.push_back(sl::make_write(preg.region(), psrc.bytes().subspan(i * spitch, mwidth), *region));
  }

  const auto whole = [&] {
    std::vector<std::byte> v(total);
    check(cudaMemcpy(v.data(), engine.data(), total, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
    return v;
  };

  // One row outside every exposed region (into the gap after row 0 of the matrix): the whole
  // batch is refused, and not a byte moved.
  {
    auto bad = batch;
    const auto* m0 = conn.remote_regions().find("m.0");
    REQUIRE(m0);
    bad.insert(bad.begin() + rows, sl::make_write(preg.region(), psrc.bytes().subspan(0, mwidth), *m0, 1));
    CHECK(wait_write(io, conn, bad) == sl::errc::region_not_exposed);
    CHECK(conn.is_open());
    const auto after = whole();
    std::size_t moved = 0;
    for (const auto b : after) moved += b != poison ? 1 : 0;
    CHECK(moved == 0);
  }

  REQUIRE(wait_write(io, conn, batch) == std::error_code{});
  // The completion came after the copies: read at once, on another stream.
  const auto got = whole();
  std::vector<std::byte> want(total, poison);
  for (std::size_t r = 0; r < 2; ++r)
    for (std::size_t i = 0; i < rows; ++i)
      for (std::size_t k = 0; k < mine; ++k)
        want[guard + r * slice + i * mine + k] = static_cast<std::byte>(parameter[i * row_bytes + r * mine + k]);
  for (std::size_t i = 0; i < mrows; i += 2)
    for (std::size_t k = 0; k < mwidth; ++k)
      want[guard + 2 * slice + guard + i * mpitch + moffset + k] = static_cast<std::byte>(host_rows[i * spitch + k]);
  std::size_t wrong = 0, first_wrong = total;
  for (std::size_t i = 0; i < total; ++i)
    if (got[i] != want[i]) {
      if (wrong++ == 0) first_wrong = i;
    }
  INFO("first wrong byte at " << first_wrong << " of " << total);
  CHECK(wrong == 0);
  // The rows in between and the guards are still the poison (a wrong pitch would write them).
  CHECK(got[guard - 1] == poison);
  CHECK(got[guard + 2 * slice] == poison);
  CHECK(got[guard + 2 * slice + guard + 1 * mpitch + moffset] == poison);
  CHECK(got[total - 1] == poison);

  conn.close();
  rx.close();
  io.poll();
}

TEST_SUITE_END();
