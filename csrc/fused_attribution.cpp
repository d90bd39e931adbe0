// CPU kernel of the fused attribution (see fused_attribution.h for the contract).
//
// Work item = a tile of kDefaultTile consecutive tokens (fixed tiling from token 0; OpenMP dynamic
// schedule, so a thread that loses its core for a while, common on shared VMs, does not hold the
// call up; which thread takes a tile never changes its results). Per tile, in per-thread buffers:
//   1. z of the tile: read in place (native dtype, full tile), else packed head-major (converted to
//      the accumulation type), zero-padded to a multiple of MR tokens: Zp[N][H][tile]; gathered
//      mode: form the tile's (centred) target directions;
//   2. for each pass over CW d_model columns (one pass for d_model <= 1024):
//      a. project: Rc[i][n][:] = z[t0 + i, n, :] @ W_O[n][:, pass] with a register-blocked
//         micro-kernel (MR tokens x NR SIMD vectors) on W_O packed once per call into contiguous
//         column panels; Rc holds the tile's tokens only (tile x N x CW, in L2/L3);
//      b. per token: add the pass's share of every DLA, dot and squared norm to the outputs.
//   Only the tile's head outputs exist at any time, never a [T, N, d_model] array.
// The dots of writer heads with each other form a symmetric Gram block: only its upper triangle
// (by writer position) is computed, the rest is copied, and a writer's squared norm is its diagonal.
// Every output element is reduced in an order fixed by the shapes alone (pass by pass; within a
// pass lane-wise, horizontal sum, tail), so the result does not depend on the number of threads.
#include "fused_attribution.h"
#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ef {
namespace EF_ISA {
namespace {

using namespace detail;

// Tokens per work item (rounded up to a multiple of MR) and d_model columns per pass (rounded up to
// a multiple of NR * SIMD width). Measured on the 2-core AVX2 machine (GELU-4L, 8192 tokens): tiles
// of 6-12 tokens beat 18-24 (W_O panels are re-read per tile, but the tile's outputs stay in cache);
// passes narrower than d_model lost at d_model 512 and 768 (each pass adds a horizontal sum per
// dot), so a pass covers d_model up to 1024 columns and only wider models are cut.
constexpr int kDefaultTile = 12;
constexpr int kDefaultChunk = 1024;

template <typename T>
struct Scratch {
  Buf<T> zp, rc, dv, ex;
  Vec<const T*> rows, cols, dir_rows;
  Vec<T*> out_rows;
};

}  // namespace

template <typename In>
void fused_attribution(const FusedParams<In>& p) {
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
  const int64_t T_ = n_tokens, N = n_heads, H = d_head, D = d_model, K = n_dirs, W = n_writers,
                M = n_extra, NM = N + M;
  if (T_ <= 0 || N <= 0 || H <= 0 || D <= 0) return;
  constexpr int L = Simd<T>::L;
  constexpr int64_t BW = NR * L;  // columns per projection micro-kernel
  const int64_t Dp = round_up(D, BW);
  const int64_t CW = std::min(Dp, round_up(chunk_cols > 0 ? chunk_cols : kDefaultChunk, BW));
  const int64_t tile = round_up(tile_tokens > 0 ? tile_tokens : kDefaultTile, MR);  // tokens per work item
  const int64_t n_tiles = (T_ + tile - 1) / tile;
  const bool gathered = direction_ids != nullptr;
  constexpr bool kNative = std::is_same<typename In::storage, T>::value;

  // W_O packed into column panels, zero-padded to Dp columns: Wpk[n][jb][k][0 .. BW). A panel
  // (H x BW) is contiguous, so it stays in L1 while it is reused across the tile's token blocks (a
  // row stride of d_model would map the panel's rows onto few cache sets). Packed once per call.
  const int64_t n_jb = Dp / BW;
  Buf<T> wpk(static_cast<size_t>(N * H * Dp));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t jb = 0; jb < n_jb; ++jb)
      for (int64_t k = 0; k < H; ++k) {
        const int64_t nc = std::min<int64_t>(BW, D - jb * BW);
        T* dst = wpk.get() + ((n * n_jb + jb) * H + k) * BW;
        load_row<In>(W_O + (n * H + k) * D + jb * BW, nc, dst);
        std::fill(dst + nc, dst + BW, T(0));
      }
  const T* Wp = wpk.get();
  // Fixed mode: the K directions, converted and centred once.
  Buf<T> fixed_dirs = gathered ? Buf<T>() : fixed_directions<In>(directions, K, D, center);

  // Writer structure. first_pos[a]: first position of head a in `writers` (-1: not a writer).
  // Gram rows: the positions p whose head is seen there first; row p is computed for the columns
  // >= p only. Plain rows: every other node (non-writer heads, extra nodes), against all W columns.
  Vec<int64_t> first_pos(N, -1), gram_pos, plain_nodes;
  for (int64_t p = 0; p < W; ++p)
    if (first_pos[writers[p]] < 0) {
      first_pos[writers[p]] = p;
      gram_pos.push_back(p);
    }
  for (int64_t a = 0; a < NM; ++a)
    if (a >= N || first_pos[a] < 0) plain_nodes.push_back(a);
  const int64_t G = static_cast<int64_t>(gram_pos.size()), P = static_cast<int64_t>(plain_nodes.size());

  const int nthr = resolve_threads(n_threads, n_tiles);

  // Per-thread scratch, allocated here so no allocation (or exception) happens in the parallel region.
  Vec<Scratch<T>> scratch(nthr);
  for (auto& s : scratch) {
    s.zp = Buf<T>(static_cast<size_t>(N * H * tile));
    s.rc = Buf<T>(static_cast<size_t>(tile * N * CW));
    if (gathered) s.dv = Buf<T>(static_cast<size_t>(tile * D));
    if (!kNative && M > 0) s.ex = Buf<T>(static_cast<size_t>(tile * M * D));
    s.rows.resize(std::max<int64_t>(NM, 1));
    s.cols.resize(std::max<int64_t>(std::max(W, K), 1));
    s.dir_rows.resize(std::max<int64_t>(K, 1));
    s.out_rows.resize(std::max<int64_t>(NM, 1));
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();

#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
#ifdef _OPENMP
    Scratch<T>& s = scratch[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 2)
#else
    Scratch<T>& s = scratch[0];
#endif
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      if (nonfinite_found(p.nonfinite)) continue;
      const int64_t t0 = ti * tile;
      const int64_t nt = std::min<int64_t>(tile, T_ - t0);
      const int64_t ntp = round_up(nt, MR);  // token rows actually projected
      T* __restrict rc = s.rc.get();

      // 1. z of the tile as the projection reads it: in place (native dtype, full tile: no copy),
      //    else packed Zp[n][k][i] = z[t0 + i, n, k] (converted), zero for the padded tokens.
      const T* zsrc = nullptr;  // token i's value k of head n: zsrc[n * zn + k * zk + i * zi]
      int64_t zn = 0, zk = 0, zi = 0;
      if constexpr (kNative) {
        if (nt == tile) zsrc = z + t0 * N * H, zn = H, zk = 1, zi = N * H;
      }
      if (!zsrc) {
        T* zp = s.zp.get();
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < H; ++k) {
            T* dst = zp + (n * H + k) * tile;
            for (int64_t i = 0; i < nt; ++i) dst[i] = In::load(z[((t0 + i) * N + n) * H + k]);
            for (int64_t i = nt; i < ntp; ++i) dst[i] = T(0);
          }
        zsrc = zp, zn = H * tile, zk = tile, zi = 1;
      }
      // the tile's target directions (gathered), extra nodes (converted unless native)
      if (gathered)
        for (int64_t i = 0; i < nt; ++i)
          token_dir<In>(directions, D, direction_ids, incorrect_ids, t0 + i, center, s.dv.get() + i * D);
      if (!kNative && M > 0) load_row<In>(extra + t0 * M * D, nt * M * D, s.ex.get());
      // a bad value: no output is returned, so the item's work is skipped
      if (nonfinite_item<In>(p.nonfinite, z, N * H, extra, M * D, t0, nt)) continue;

      // One pass over columns [c0, c0 + cw); the first pass writes the outputs (kAcc false: no
      // zero-fill beforehand), later passes add to them. Every output element gets written in
      // the first pass (the Gram block's lower part and the writers' norms in step 3).
      auto pass = [&](int64_t c0, auto acc_tag) {
        constexpr bool kAcc = decltype(acc_tag)::value;
        const int64_t cw = std::min(CW, Dp - c0);  // projected columns (multiple of BW)
        const int64_t len = std::min(cw, D - c0);  // real columns (>= 1: c0 < Dp - BW + 1 <= D)

        // 2a. project: Rc[i][n][:] = sum_k z[t0 + i, n, k] * W_O[n][k][c0 : c0 + cw].
        for (int64_t n = 0; n < N; ++n)
          for (int64_t jb = c0; jb < c0 + cw; jb += BW)
            for (int64_t ib = 0; ib < ntp; ib += MR)
              project_block<T>(zsrc + n * zn + ib * zi, zk, Wp + (n * n_jb + jb / BW) * H * BW, BW,
                               H, rc + (ib * N + n) * CW + (jb - c0), N * CW, zi);

        // 2b. per token: this pass's share of the DLA, the dots and the norms.
        for (int64_t i = 0; i < nt; ++i) {
          const int64_t t = t0 + i;
          const T* Rt = rc + i * N * CW;
          T* dots_t = dots + t * NM * W;
          auto node_row = [&](int64_t a) -> const T* {
            if (a < N) return Rt + a * CW;
            if constexpr (kNative) return extra + (t * M + (a - N)) * D + c0;
            return s.ex.get() + (i * M + (a - N)) * D + c0;
          };
          for (int64_t a = 0; a < N; ++a) s.rows[a] = Rt + a * CW;

          // DLA: heads against the token's direction (gathered) or the K fixed directions.
          if (gathered) {
            const T* dir = s.dv.get() + i * D + c0;
            T* out = dla + t * N;
            dot_tiles<T, kAcc>(s.rows.data(), N, &dir, 1, len, [=](int64_t a) { return out + a; }, 1);
          } else {
            for (int64_t k = 0; k < K; ++k) s.dir_rows[k] = fixed_dirs.get() + k * D + c0;
            T* out = dla + t * N * K;
            dot_tiles<T, kAcc>(s.rows.data(), N, s.dir_rows.data(), K, len,
                               [=](int64_t a) { return out + a * K; }, 1);
          }

          if (W > 0) {
            for (int64_t p = 0; p < W; ++p) s.cols[p] = Rt + writers[p] * CW;
            // Gram rows in blocks of DA: the block's columns start at its first row's position
            // (entries left of a row's own position are recomputed but overwritten below).
            for (int64_t g0 = 0; g0 < G; g0 += DA) {
              const int64_t ng = std::min<int64_t>(DA, G - g0), p0 = gram_pos[g0];
              for (int64_t g = 0; g < ng; ++g) {
                s.rows[g] = s.cols[gram_pos[g0 + g]];
                s.out_rows[g] = dots_t + writers[gram_pos[g0 + g]] * W + p0;
              }
              dot_tiles<T, kAcc>(s.rows.data(), ng, s.cols.data() + p0, W - p0, len,
                                 [&](int64_t g) { return s.out_rows[g]; }, 1);
            }
            for (int64_t q = 0; q < P; ++q) s.rows[q] = node_row(plain_nodes[q]);
            dot_tiles<T, kAcc>(s.rows.data(), P, s.cols.data(), W, len,
                               [&](int64_t q) { return dots_t + plain_nodes[q] * W; }, 1);
          }
          T* nrm = norms + t * NM;
          for (int64_t q = 0; q < P; ++q) {
            const T sq = sumsq<T>(node_row(plain_nodes[q]), len);
            nrm[plain_nodes[q]] = kAcc ? nrm[plain_nodes[q]] + sq : sq;
          }
        }
      };
      pass(0, std::false_type{});
      for (int64_t c0 = CW; c0 < Dp; c0 += CW) pass(c0, std::true_type{});

      // 3. per token: the Gram block's lower part and diagonal, the scale, the missing targets.
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i;
        T* dots_t = dots + t * NM * W;
        T* nrm = norms + t * NM;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t p = gram_pos[g], a = writers[p];
          // dot(a, writers[q]) for q < p lives in writers[q]'s row at column p (p >= its first position)
          for (int64_t q = 0; q < p; ++q) dots_t[a * W + q] = dots_t[writers[q] * W + p];
          nrm[a] = dots_t[a * W + p];
        }
        const T st = scale[t];
        if (gathered) {
          T* out = dla + t * N;
          const bool missing = no_target(direction_ids, incorrect_ids, t);
          for (int64_t n = 0; n < N; ++n) out[n] = missing ? nan : out[n] / st;
        } else {
          T* out = dla + t * N * K;
          for (int64_t e = 0; e < N * K; ++e) out[e] = out[e] / st;
        }
        check_dla_outputs(p.out_nonfinite, dla, gathered ? N : N * K, t, 1, direction_ids, incorrect_ids);
        check_outputs(p.out_nonfinite, dots_t, NM * W, kNonfiniteDots);
        check_outputs(p.out_nonfinite, nrm, NM, kNonfiniteNorms);
      }
    }
  }
}

#define EF_INSTANTIATE_FUSED(In)                                                                   \
  template void fused_attribution<In>(const FusedParams<In>&);
EF_INSTANTIATE_FUSED(Native<float>)
EF_INSTANTIATE_FUSED(Native<double>)
EF_INSTANTIATE_FUSED(Bf16)
EF_INSTANTIATE_FUSED(F16)
#undef EF_INSTANTIATE_FUSED

int default_tile_tokens() { return kDefaultTile; }
int default_chunk_cols() { return kDefaultChunk; }

}  // namespace EF_ISA
}  // namespace ef
