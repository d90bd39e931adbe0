// Fused attribution with tokens in the SIMD lanes: the AVX-512 path's kernel (contract and
// signature: fused_attribution.h). Compiled for the avx512 and avx512_bf16 paths (the latter multiplies
// bf16 inputs in pairs in the projection: project_lanes_pairs).
//
// Why a second layout: with 16-float vectors the row layout of fused_attribution.cpp (vectors over
// d_model, one token at a time) spends its time outside the FMAs: every dot ends in a horizontal
// sum, a token's head outputs (N x d_model) overflow L1 so the dot blocks stream them from L2, and
// W_O (4 MiB for GELU-4L) is re-read from L3 every 12 tokens. Measured on a 2-core Sapphire Rapids
// (GELU-4L K1, 8,192 tokens, one thread, CPU time): that layout at 16 lanes reached 52-58 % of the
// matmul rate, its dot stage 36 %. Here a vector holds one value of L consecutive tokens instead:
//
//   lane tile  TL = kV * L tokens (32 fp32 / 16 fp64); a work item is `sub` lane tiles;
//   z          transposed once per tile to Zt[n][k][TL] (16 x 16 register transposes, converted);
//   per pass over DC columns of d_model (DC = chunk_cols, default kDefaultChunk):
//     project  Rc[n][dd][TL] = sum_k W_O[n][k][c0 + dd] * Zt[n][k][:]  (W_O broadcast, tokens in the
//              lanes: kMD x kV accumulators), W_O packed once per call as panels [n][db][k][kMD];
//     dots     every needed (row, column) pair over the pass: lane-wise FMAs over dd in kRA x kRB
//              blocks (no horizontal sums), added to the tile's accumulators Acc[row][col][TL];
//   rows: heads, extra nodes (transposed per pass to Ec[m][dd][TL]); columns: the distinct writers,
//   one for the row's squared norm, then the DLA directions (gathered: one per lane, Dt[d][TL];
//   fixed: K broadcast directions).
// Writer-writer dots are taken once (upper triangle of the Gram block, as in the row layout) and
// mirrored in the lanes before the accumulators are written out token by token.
//
// Reduction order, fixed by the shapes: every output is, per lane (token), a sequential FMA chain
// over the pass's columns started from 0, and the passes are added in column order; the projection
// is a sequential FMA chain over k. Lanes never mix, so results do not depend on the thread count,
// the tile or which lane a token lands in; they differ from the row layout's in rounding only.
#include "fused_attribution.h"
#include "kernel_common.h"
#include "lanes_common.h"

#if defined(__AVX512F__)

#include <algorithm>
#include <array>
#include <cstdlib>
#include <utility>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ef {
namespace EF_ISA {
namespace {

using namespace detail;

constexpr int kV = 2;              // token vectors per lane tile
constexpr int kMD = 8;             // d_model columns per projection micro-kernel (kMD x kV accumulators)
constexpr int kRA = 6, kRB = 4;    // dot blocks: rows x columns of one lane vector (kRA x kRB accumulators)
constexpr int kDefaultChunk = 32;  // d_model columns per pass
constexpr int kSub = 1;            // lane tiles per work item (default)

// ---------------------------------------------------------------------------------------------
// Micro-kernels.

// Makes the compiler load v into a register once instead of folding the load into each FMA that
// reads it: with 24 accumulators it would otherwise reload A for every column (30 loads per 24
// FMAs, more than the two load ports feed).
template <typename R>
inline void keep_in_register(R& v) {
  __asm__("" : "+v"(v));
}

// rc[dd][0 .. TL) = sum_k wp[k][dd] * zt[k][0 .. TL) for dd < kMD; wp is one packed W_O panel [H][kMD].
template <typename T>
inline void project_lanes(const T* __restrict zt, const T* __restrict wp, int64_t H, T* __restrict rc) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int L = S::L, TL = kV * L;
  reg acc[kMD][kV];
  for (int j = 0; j < kMD; ++j)
    for (int v = 0; v < kV; ++v) acc[j][v] = S::zero();
  for (int64_t k = 0; k < H; ++k) {
    reg zv[kV];
    for (int v = 0; v < kV; ++v) zv[v] = S::load(zt + k * TL + v * L);
    const T* w = wp + k * kMD;
    for (int j = 0; j < kMD; ++j) {
      const reg wb = S::set1(w[j]);
      for (int v = 0; v < kV; ++v) acc[j][v] = S::fma(wb, zv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < kMD; ++j)
    for (int v = 0; v < kV; ++v) S::store(rc + j * TL + v * L, acc[j][v]);
}

#if defined(__AVX512BF16__)
// The projection of bfloat16 inputs from pairs (the avx512_bf16 path): rc[dd][0 .. TL) = sum_k
// W_O[k][dd] * z[k][lanes] for dd < kMD, where zp[j][lane] holds the lane's (z[2j], z[2j + 1]) and
// wp[j][dd] the pair (W_O[2j][dd], W_O[2j + 1][dd]) of one packed panel [H / 2][kMD]. One VDPBF16PS per
// pair and vector: the two products are exact in fp32 and are added to the accumulator in turn, as two
// FMAs would (the odd k first); inputs and results below 2^-126 count as zero (bf16 / fp32
// subnormals). Twice the fp32 FMA's multiply-adds per instruction, and half the bytes of z per token.
inline void project_lanes_pairs(const float* __restrict zp, const uint32_t* __restrict wp, int64_t Hp,
                                float* __restrict rc) {
  constexpr int L = 16, TL = kV * L;
  __m512 acc[kMD][kV];
  for (int j = 0; j < kMD; ++j)
    for (int v = 0; v < kV; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Hp; ++k) {
    __m512bh zv[kV];
    for (int v = 0; v < kV; ++v) zv[v] = reinterpret_cast<__m512bh>(_mm512_load_ps(zp + k * TL + v * L));
    const uint32_t* w = wp + k * kMD;
    for (int j = 0; j < kMD; ++j) {
      const __m512bh wb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(w[j])));
      for (int v = 0; v < kV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], wb, zv[v]);
    }
  }
  for (int j = 0; j < kMD; ++j)
    for (int v = 0; v < kV; ++v) _mm512_store_ps(rc + j * TL + v * L, acc[j][v]);
}
#endif

// out[i * RB + j][0 .. L) (=, or += unless first) sum_{dd < len} A[i][dd * TL + 0 .. L) *
// B[j][dd * TL + 0 .. L): one lane vector of a lane tile (pointers offset to it), one sequential FMA
// chain per lane. A vector of B is used RA times and one of A RB times, so a block costs
// (1 / RA + 1 / RB) loads per FMA; B streams from L2 while A stays in L1 (64 / RA bytes per FMA).
template <typename T, int RA, int RB>
void lane_dots(const T* const* A, const T* const* B, int64_t len, T* const* out, bool first) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int TL = kV * S::L;
  const T* a[RA];
  const T* b[RB];
  for (int i = 0; i < RA; ++i) a[i] = A[i];
  for (int j = 0; j < RB; ++j) b[j] = B[j];
  reg acc[RA][RB];
  // (fully unrolled so that the accumulators never leave the registers)
#pragma GCC unroll 8
  for (int i = 0; i < RA; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) acc[i][j] = S::zero();
  for (int64_t dd = 0; dd < len; ++dd) {
    reg bv[RB];
#pragma GCC unroll 8
    for (int j = 0; j < RB; ++j) bv[j] = S::load(b[j] + dd * TL);
#pragma GCC unroll 8
    for (int i = 0; i < RA; ++i) {
      reg av = S::load(a[i] + dd * TL);
      keep_in_register(av);
#pragma GCC unroll 8
      for (int j = 0; j < RB; ++j) acc[i][j] = S::fma(av, bv[j], acc[i][j]);
    }
  }
  if (first) {
#pragma GCC unroll 8
    for (int i = 0; i < RA; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < RB; ++j) S::store(out[i * RB + j], acc[i][j]);
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < RA; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < RB; ++j) S::store(out[i * RB + j], S::add(S::load(out[i * RB + j]), acc[i][j]));
  }
}

template <typename T>
using LaneDotFn = void (*)(const T* const*, const T* const*, int64_t, T* const*, bool);

template <typename T, int RA, int... J>
constexpr std::array<LaneDotFn<T>, kRB> lane_dot_row_of(std::integer_sequence<int, J...>) {
  return {&lane_dots<T, RA, J + 1>...};
}

template <typename T, int... I>
constexpr std::array<std::array<LaneDotFn<T>, kRB>, kRA> lane_dot_table(std::integer_sequence<int, I...>) {
  return {lane_dot_row_of<T, I + 1>(std::make_integer_sequence<int, kRB>{})...};
}

// The pairs (A[a], B[b]) for a < na and b0(a's block) <= b < nb, in kRA x kRB blocks, for lane
// vector v; out(a, b) is the pair's accumulator [TL].
template <typename T, typename Out, typename B0>
void lane_dot_blocks(const T* const* A, int64_t na, const T* const* B, int64_t nb, int64_t len, Out out,
                     B0 b0_of, bool first) {
  using S = Simd<T>;
  static constexpr auto table = lane_dot_table<T>(std::make_integer_sequence<int, kRA>{});
  const T* pa[kRA];
  const T* pb[kRB];
  T* outs[kRA * kRB];
  for (int v = 0; v < kV; ++v)
    for (int64_t a0 = 0; a0 < na; a0 += kRA) {
      const int ra = static_cast<int>(std::min<int64_t>(kRA, na - a0));
      for (int i = 0; i < ra; ++i) pa[i] = A[a0 + i] + v * S::L;
      for (int64_t b0 = b0_of(a0); b0 < nb; b0 += kRB) {
        const int rb = static_cast<int>(std::min<int64_t>(kRB, nb - b0));
        for (int j = 0; j < rb; ++j) pb[j] = B[b0 + j] + v * S::L;
        for (int i = 0; i < ra; ++i)
          for (int j = 0; j < rb; ++j) outs[i * rb + j] = out(a0 + i, b0 + j) + v * S::L;
        table[ra - 1][rb - 1](pa, pb, len, outs, first);
      }
    }
}

// out[lanes] (=, or += unless first) sum_{dd < len} row[dd][lanes]^2
template <typename T>
void lane_sumsq(const T* __restrict row, int64_t len, T* __restrict out, bool first) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int L = S::L, TL = kV * L;
  reg acc[kV];
  for (int v = 0; v < kV; ++v) acc[v] = S::zero();
  for (int64_t dd = 0; dd < len; ++dd)
    for (int v = 0; v < kV; ++v) {
      const reg x = S::load(row + dd * TL + v * L);
      acc[v] = S::fma(x, x, acc[v]);
    }
  for (int v = 0; v < kV; ++v) S::store(out + v * L, first ? acc[v] : S::add(S::load(out + v * L), acc[v]));
}

// out[lanes] (=, or += unless first) sum_{dd < len} row[dd][lanes] * dir[dd]  (a fixed direction)
template <typename T>
void lane_dot_fixed(const T* __restrict row, const T* __restrict dir, int64_t len, T* __restrict out,
                    bool first) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int L = S::L, TL = kV * L;
  reg acc[kV];
  for (int v = 0; v < kV; ++v) acc[v] = S::zero();
  for (int64_t dd = 0; dd < len; ++dd) {
    const reg d = S::set1(dir[dd]);
    for (int v = 0; v < kV; ++v) acc[v] = S::fma(S::load(row + dd * TL + v * L), d, acc[v]);
  }
  for (int v = 0; v < kV; ++v) S::store(out + v * L, first ? acc[v] : S::add(S::load(out + v * L), acc[v]));
}

template <typename T>
struct LaneScratch {
  Prefetcher next;
  Buf<T> zt, rc, ec, dt, acc, dv, stage;
  Vec<const T*> wrow, prow, hrow;  // the pass's rows: writers, plain rows, heads
};

}  // namespace

template <typename In>
void fused_attribution_lanes(const FusedParams<In>& p) {
  const auto* z = p.z;
  const auto* W_O = p.W_O;
  const auto* directions = p.directions;
  const auto* scale = p.scale;
  const int64_t* writers = p.writers;
  const auto* extra = p.extra;
  const int64_t* direction_ids = p.direction_ids;
  const int64_t* incorrect_ids = p.incorrect_ids;
  const int64_t n_tokens = p.n_tokens, n_heads = p.n_heads, d_head = p.d_head, d_model = p.d_model,
                n_dirs = p.n_dirs, n_writers = p.n_writers, n_extra = p.n_extra;
  const bool center = p.center;
  auto* dla = p.dla;
  auto* dots = p.dots;
  auto* norms = p.norms;
  const int n_threads = p.n_threads, tile_tokens = p.tile_tokens, chunk_cols = p.chunk_cols;
  using T = typename In::acc;
  using S = Simd<T>;
  constexpr int64_t L = S::L, TL = kV * L;
  const int64_t T_ = n_tokens, N = n_heads, H = d_head, D = d_model, K = n_dirs, W = n_writers,
                M = n_extra, NM = N + M, NH = N * H;
  if (T_ <= 0 || N <= 0 || H <= 0 || D <= 0) return;
  const bool gathered = direction_ids != nullptr;
  const int64_t Dp = round_up(D, kMD), n_db = Dp / kMD;
  const int64_t DC = std::min(Dp, round_up(chunk_cols > 0 ? chunk_cols : kDefaultChunk, kMD));
  const int64_t sub = tile_tokens > 0 ? (tile_tokens + TL - 1) / TL : kSub;  // lane tiles per work item
  const int64_t tile = sub * TL;
  const int64_t n_tiles = (T_ + tile - 1) / tile;

  // bf16 inputs on the avx512_bf16 path (an even d_head): the projection multiplies pairs of bf16
  // values (project_lanes_pairs); z's lane tiles and W_O's panels then hold pairs along k.
#if defined(__AVX512BF16__)
  const bool pairs = std::is_same<In, Bf16>::value && H % 2 == 0;
#else
  const bool pairs = false;
#endif
  const int64_t Hp = H / 2, NHp = NH / 2;
  // W_O in panels Wpk[n][db][k][0 .. kMD) (columns db * kMD ..., zero past D), converted once; for
  // pairs Wpp[n][db][j][0 .. kMD) = (W_O[n][2j][d], W_O[n][2j + 1][d]) as they are.
  Buf<T> wpk = pairs ? Buf<T>() : Buf<T>(static_cast<size_t>(N * n_db * H * kMD));
  Buf<uint32_t> wpp = pairs ? Buf<uint32_t>(static_cast<size_t>(N * n_db * Hp * kMD)) : Buf<uint32_t>();
  if constexpr (std::is_same<In, Bf16>::value) {
    if (pairs)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t db = 0; db < n_db; ++db)
          for (int64_t j = 0; j < Hp; ++j) {
            uint32_t* dst = wpp.get() + ((n * n_db + db) * Hp + j) * kMD;
            const uint16_t* w0 = W_O + (n * H + 2 * j) * D;
            for (int64_t jj = 0; jj < kMD; ++jj) {
              const int64_t d = db * kMD + jj;
              dst[jj] = d < D ? static_cast<uint32_t>(w0[d]) | static_cast<uint32_t>(w0[D + d]) << 16 : 0u;
            }
          }
  }
  for (int64_t n = 0; n < N && !pairs; ++n)
    for (int64_t db = 0; db < n_db; ++db)
      for (int64_t k = 0; k < H; ++k) {
        T* dst = wpk.get() + ((n * n_db + db) * H + k) * kMD;
        for (int64_t j = 0; j < kMD; ++j) {
          const int64_t d = db * kMD + j;
          dst[j] = d < D ? In::load(W_O[(n * H + k) * D + d]) : T(0);
        }
      }
  Buf<T> fixed_dirs = gathered ? Buf<T>() : fixed_directions<In>(directions, K, D, center);

  // Columns of a row's accumulators: the distinct writers gw[g] in order of first position (g_of[head],
  // -1: not a writer), the row's squared norm (column G), the DLA (G + 1 ...: one gathered, K fixed).
  // Plain rows: the nodes that are not writers.
  Vec<int64_t> g_of(N, -1), gw, plain;
  for (int64_t p = 0; p < W; ++p)
    if (g_of[writers[p]] < 0) {
      g_of[writers[p]] = static_cast<int64_t>(gw.size());
      gw.push_back(writers[p]);
    }
  for (int64_t a = 0; a < NM; ++a)
    if (a >= N || g_of[a] < 0) plain.push_back(a);
  const int64_t G = static_cast<int64_t>(gw.size()), P = static_cast<int64_t>(plain.size());
  const int64_t C = G + 1 + (gathered ? 1 : K);
  const int64_t Cp = round_up(C, Simd<T>::L);  // a row's accumulators, token-major (stage)
  // writer position p -> accumulator column; in order (every head a writer, once) dots rows copy whole
  Vec<int64_t> col(W);
  bool in_order = W == G;
  for (int64_t p = 0; p < W; ++p) col[p] = g_of[writers[p]], in_order = in_order && col[p] == p;

  const int nthr = resolve_threads(n_threads, n_tiles);
  Vec<LaneScratch<T>> scratch(nthr);
  for (auto& s : scratch) {
    s.zt = Buf<T>(static_cast<size_t>(sub * NH * TL));
    s.rc = Buf<T>(static_cast<size_t>(sub * N * DC * TL));
    if (M > 0) s.ec = Buf<T>(static_cast<size_t>(sub * M * D * TL));
    if (gathered) {
      s.dt = Buf<T>(static_cast<size_t>(sub * D * TL));
      s.dv = Buf<T>(static_cast<size_t>(L * D));
    }
    s.acc = Buf<T>(static_cast<size_t>(sub * NM * C * TL));
    s.stage = Buf<T>(static_cast<size_t>(TL * Cp));
    s.next.spans.reserve(static_cast<size_t>(2 * tile + 2));
    s.wrow.resize(G);
    s.prow.resize(P);
    s.hrow.resize(N);
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T* Wp = wpk.get();

#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
#ifdef _OPENMP
    LaneScratch<T>& s = scratch[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
#else
    LaneScratch<T>& s = scratch[0];
#endif
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      if (nonfinite_found(p.nonfinite)) continue;
      const int64_t t0 = ti * tile;
      const int64_t nt = std::min(tile, T_ - t0);
      const int64_t n_sub = (nt + TL - 1) / TL;
      // lane tile u holds tokens t0 + u * TL + lane; its buffers:
      auto zt_of = [&](int64_t u) { return s.zt.get() + u * NH * TL; };
      auto rc_of = [&](int64_t u) { return s.rc.get() + u * N * DC * TL; };
      auto ec_of = [&](int64_t u) { return s.ec.get() + u * M * D * TL; };
      auto dt_of = [&](int64_t u) { return s.dt.get() + u * D * TL; };
      auto acc_of = [&](int64_t u) { return s.acc.get() + u * NM * C * TL; };
      // the inputs of the tile this thread most likely takes next (dynamic schedule: ti + threads)
      prefetch_tile_inputs<In>(s.next, z, extra, directions, direction_ids, incorrect_ids, t0 + nthr * tile,
                               tile, T_, NH, M, D);
      s.next.start(static_cast<size_t>(((D + DC - 1) / DC) * N));
      auto lanes_in = [&](int64_t u, int v) { return std::max<int64_t>(0, std::min<int64_t>(L, nt - u * TL - v * L)); };

      for (int64_t u = 0; u < n_sub; ++u)
        for (int v = 0; v < kV; ++v) {
          const int64_t tv = t0 + u * TL + v * L, nl = lanes_in(u, v);
          // z, lanes minor: Zt[n * H + k][lane] (zero lanes past the last token)
          // (pairs: the rows' bf16 pairs moved as 32-bit values, Zp[n * H / 2 + j][lane])
          bool packed = false;
          if constexpr (std::is_same<In, Bf16>::value)
            if (pairs) {
              pack_lanes<Native<float>>(reinterpret_cast<const float*>(z + std::min(tv, T_ - 1) * NH), NHp, nl,
                                        NHp, zt_of(u) + v * L, TL);
              packed = true;
            }
          if (!packed) pack_lanes<In>(z + std::min(tv, T_ - 1) * NH, NH, nl, NH, zt_of(u) + v * L, TL);
          // extra nodes, lanes minor: Ec[m][d][lane]
          for (int64_t m = 0; m < M; ++m)
            pack_lanes<In>(extra + (std::min(tv, T_ - 1) * M + m) * D, M * D, nl, D, ec_of(u) + m * D * TL + v * L, TL);
          if (!gathered) continue;
          // the lanes' centred target directions Dt[d][lane] (zero where a token has none)
          T* dv = s.dv.get();
          for (int64_t i = 0; i < nl; ++i)
            token_dir<In>(directions, D, direction_ids, incorrect_ids, tv + i, center, dv + i * D);
          pack_lanes<Native<T>>(dv, D, nl, D, dt_of(u) + v * L, TL);
        }
      // a bad value: no output is returned, so the item's work is skipped
      if (nonfinite_item<In>(p.nonfinite, z, NH, extra, M * D, t0, nt)) continue;

      for (int64_t c0 = 0; c0 < D; c0 += DC) {
        const bool first = c0 == 0;
        const int64_t len = std::min(DC, D - c0);  // real columns of the pass
        const int64_t nb = (len + kMD - 1) / kMD;  // projected column blocks
        // project every head's pass (a W_O panel is reused across the lane tiles)
        for (int64_t n = 0; n < N; ++n) {
          s.next.step();
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t panel = n * n_db + c0 / kMD + b;
#if defined(__AVX512BF16__)
            if constexpr (std::is_same<In, Bf16>::value)
              if (pairs) {
                for (int64_t u = 0; u < n_sub; ++u)
                  project_lanes_pairs(zt_of(u) + n * Hp * TL, wpp.get() + panel * Hp * kMD, Hp,
                                      rc_of(u) + (n * DC + b * kMD) * TL);
                continue;
              }
#endif
            for (int64_t u = 0; u < n_sub; ++u)
              project_lanes<T>(zt_of(u) + n * H * TL, Wp + panel * H * kMD, H, rc_of(u) + (n * DC + b * kMD) * TL);
          }
        }
        for (int64_t u = 0; u < n_sub; ++u) {
          T* rc = rc_of(u);
          T* ec = M > 0 ? ec_of(u) : nullptr;
          auto row = [&](int64_t a) -> const T* { return a < N ? rc + a * DC * TL : ec + ((a - N) * D + c0) * TL; };
          T* acc = acc_of(u);
          auto out = [&](int64_t a, int64_t c) { return acc + (a * C + c) * TL; };
          auto& wrow = s.wrow;
          auto& prow = s.prow;
          auto& hrow = s.hrow;
          for (int64_t g = 0; g < G; ++g) wrow[g] = row(gw[g]);
          for (int64_t q = 0; q < P; ++q) prow[q] = row(plain[q]);
          for (int64_t n = 0; n < N; ++n) hrow[n] = row(n);
          // the writers' Gram block from each row block's first column on (upper triangle)
          lane_dot_blocks<T>(wrow.data(), G, wrow.data(), G, len,
                             [&](int64_t ga, int64_t gb) { return out(gw[ga], gb); },
                             [](int64_t a0) { return a0; }, first);
          // plain rows against every writer, and their squared norms
          lane_dot_blocks<T>(prow.data(), P, wrow.data(), G, len,
                             [&](int64_t q, int64_t gb) { return out(plain[q], gb); },
                             [](int64_t) { return int64_t(0); }, first);
          for (int64_t q = 0; q < P; ++q) lane_sumsq<T>(prow[q], len, out(plain[q], G), first);
          // DLA of every head
          if (gathered) {
            const T* drow = dt_of(u) + c0 * TL;
            lane_dot_blocks<T>(hrow.data(), N, &drow, 1, len,
                               [&](int64_t n, int64_t) { return out(n, G + 1); },
                               [](int64_t) { return int64_t(0); }, first);
          } else {
            for (int64_t n = 0; n < N; ++n)
              for (int64_t k = 0; k < K; ++k)
                lane_dot_fixed<T>(hrow[n], fixed_dirs.get() + k * D + c0, len, out(n, G + 1 + k), first);
          }
        }
      }

      // Write the work item's outputs, row by row (a row's accumulators stay in L1).
      for (int64_t u = 0; u < n_sub; ++u) {
        T* acc = acc_of(u);
        auto out = [&](int64_t a, int64_t c) { return acc + (a * C + c) * TL; };
        // mirror the Gram block's lower part, and the writers' norms from its diagonal
        for (int64_t ga = 0; ga < G; ++ga) {
          for (int64_t gb = 0; gb < ga; ++gb) std::memcpy(out(gw[ga], gb), out(gw[gb], ga), sizeof(T) * TL);
          std::memcpy(out(gw[ga], G), out(gw[ga], ga), sizeof(T) * TL);
        }
        const int64_t nl = std::min(TL, nt - u * TL);
        const int64_t tu = t0 + u * TL;
        T* stage = s.stage.get();
        for (int64_t a = 0; a < NM; ++a) {
          // row a token-major: stage[i * Cp + c] = accumulator c of lane i
          for (int v = 0; v < kV; ++v)
            unpack_lanes<T>(out(a, 0) + v * L, std::max<int64_t>(0, std::min<int64_t>(L, nl - v * L)), C,
                            stage + v * L * Cp, Cp, TL);
          for (int64_t i = 0; i < nl; ++i) {
            const int64_t t = tu + i;
            const T* si = stage + i * Cp;
            T* dst = dots + (t * NM + a) * W;
            if (in_order)
              std::memcpy(dst, si, sizeof(T) * W);
            else
              for (int64_t p = 0; p < W; ++p) dst[p] = si[col[p]];
            norms[t * NM + a] = si[G];
            if (a >= N) continue;
            const T st = scale[t];
            if (gathered) {
              const bool missing = no_target(direction_ids, incorrect_ids, t);
              dla[t * N + a] = missing ? nan : si[G + 1] / st;
            } else {
              for (int64_t k = 0; k < K; ++k) dla[(t * N + a) * K + k] = si[G + 1 + k] / st;
            }
          }
        }
        // the lane tile's outputs, just written (in cache)
        check_outputs(p.out_nonfinite, dots + tu * NM * W, nl * NM * W, kNonfiniteDots);
        check_outputs(p.out_nonfinite, norms + tu * NM, nl * NM, kNonfiniteNorms);
        check_dla_outputs(p.out_nonfinite, dla, gathered ? N : N * K, tu, nl, direction_ids, incorrect_ids);
      }
    }
  }
}

int lanes_default_tile_tokens() { return kSub * kV * Simd<float>::L; }
int lanes_default_chunk_cols() { return kDefaultChunk; }

#define EF_INSTANTIATE_LANES(In)                                                                   \
  template void fused_attribution_lanes<In>(const FusedParams<In>&);
EF_INSTANTIATE_LANES(Native<float>)
EF_INSTANTIATE_LANES(Native<double>)
EF_INSTANTIATE_LANES(Bf16)
EF_INSTANTIATE_LANES(F16)
#undef EF_INSTANTIATE_LANES

}  // namespace EF_ISA
}  // namespace ef

#endif  // __AVX512F__
