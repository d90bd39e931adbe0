// AMX path: the avx512_bf16 path's kernels, with the fused attribution of bfloat16 inputs on the tile unit
// (contract: fused_attribution.h). Compiled for the amx path only (AVX-512 + AVX512-BF16 + AMX-BF16).
//
// One TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 fp32 accumulators:
// 16 times the fp32 FMA rate of AVX-512. Per work item of kTile tokens, per pass over DC columns of
// d_model:
//   project  R[t][n][pass] = z[t][n][:] @ W_O[n][:, pass] in fp32 (tiles: 16 tokens x 16 columns,
//            z read as it is, W_O packed once per call in the tile unit's pair-interleaved layout);
//   split    every token's head rows into bf16 parts, R = hi + lo + e (bf16 keeps 8 significant bits:
//            |lo| <= 2^-8 |R|, |e| = |R - hi - lo| <= 2^-16 |R|); the other rows are exact in bf16:
//            the extra nodes (bf16 inputs) and each DLA direction (centred in fp32) as two rows, its
//            parts hi and lo;
//   Gram     per token, Q += Hi @ Hi^T + (2 Lo) @ Hi^T over the pass (Hi^T in the tile layout by
//            16 x 16 register transposes; the exact rows have no lo, so a block of them takes only
//            the first product); the accumulators Q [R x R] stay in memory between passes.
// Then Gram = (Q + Q^T) / 2 = Hi Hi^T + Lo Hi^T + Hi Lo^T: every dot of two head rows with lo x lo and
// the e terms left out, at most 3 x 2^-16 (4.6e-5) of |a| |b| for rows a, b (observed up to 2.3e-5
// of the outputs' scale); a head row against an exact row x is (hi + lo) . x. dots, norms (the
// diagonal) and the DLA (a head row against the direction's two rows, / scale) are read from it;
// blocks of exact rows against each other are left out, but for the diagonal (the extra nodes'
// norms). Products of bf16 values are exact in fp32 and the tile unit accumulates in fp32; its inputs
// and outputs are flushed to zero below 1.2e-38 (bf16 / fp32 subnormals), values far below any
// activation's scale.
//
// Reduction order fixed by the shapes (tile by tile, pass by pass), never by the thread count: a
// token's results do not depend on which thread or work item computes it.
#include "amx_tiles.h"
#include "dispatch.h"
#include "kernel_common.h"
#include "lanes_common.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ef {
namespace EF_ISA {
namespace {

using namespace detail;

constexpr int kTile = 32;    // tokens per work item (two 16-row tiles)
constexpr int kChunk = 64;   // d_model columns per pass (a multiple of 32: two Gram k-steps)
constexpr int kGroup = 3;    // Gram accumulator tiles held at once (tmm0 .. tmm2)

// hi[0 .. 32) = bf16(x), lo2[0 .. 32) = bf16(2 (x - hi)) for x = src[0 .. 32).
inline void split_store(const float* src, uint16_t* hi, uint16_t* lo2) {
  const __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
  const __m512bh h = _mm512_cvtne2ps_pbh(x1, x0);  // [bf16(x0), bf16(x1)]
  const __m512i hb = reinterpret_cast<__m512i>(h);
  const __m512 h0 = widen_bf16(_mm512_castsi512_si256(hb)), h1 = widen_bf16(_mm512_extracti64x4_epi64(hb, 1));
  const __m512 r0 = _mm512_sub_ps(x0, h0), r1 = _mm512_sub_ps(x1, h1);  // exact
  _mm512_storeu_si512(hi, hb);
  _mm512_storeu_si512(lo2, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_add_ps(r1, r1), _mm512_add_ps(r0, r0))));
}

// hi[0 .. n) = bf16(x), lo[0 .. n) = bf16(x - hi) for x = src[0 .. n), zero up to 32 (n <= 0: all zero;
// no address past src + n is formed).
inline void split_exact_rows(const float* src, int64_t n, uint16_t* hi, uint16_t* lo) {
  const __mmask16 m0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1);
  const __mmask16 m1 = n >= 32 ? 0xFFFF : n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1);
  const __m512 x0 = _mm512_maskz_loadu_ps(m0, src), x1 = _mm512_maskz_loadu_ps(m1, n > 16 ? src + 16 : src);
  const __m512i hb = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));
  const __m512 h0 = widen_bf16(_mm512_castsi512_si256(hb)), h1 = widen_bf16(_mm512_extracti64x4_epi64(hb, 1));
  _mm512_storeu_si512(hi, hb);
  _mm512_storeu_si512(lo, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0))));
}

// dst[0 .. n) = src[0 .. n), dst[n .. n_pad) = 0 (16-bit values; n_pad a multiple of 32; src may be
// null where n = 0).
inline void copy_pad_u16(const uint16_t* src, int64_t n, int64_t n_pad, uint16_t* dst) {
  for (int64_t i = 0; i < n_pad; i += 32) {
    const int64_t k = std::max<int64_t>(0, std::min<int64_t>(32, n - i));
    const __mmask32 m = k == 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << k) - 1);
    _mm512_storeu_si512(dst + i, k > 0 ? _mm512_maskz_loadu_epi16(m, src + i) : _mm512_setzero_si512());
  }
}

// Q[rb*16 .., cb*16 ..] += [Hi | 2 Lo][rb] @ [Hi^T ; Hi^T][cb] for the row blocks rb0 .. rb0 + nr
// (nr <= kGroup), the 2 Lo product only for the first nr_lo of them (the others have no lo): A = hi
// and 2 lo rows [Rp][DC] bf16, B = Hi^T pairs [DC / 2][Rp] u32 (n_ks k-steps of 32 columns, run
// twice: hi rows, then 2 lo rows), Q [Rp][Rp] fp32. Accumulator r of the group
// lives in tile register r, its A tile in 3 + r; B alternates between tmm6 and tmm7, so a k-step's B
// loads while the previous one is still read. Each accumulator takes a product every kGroup
// products, which covers the tile unit's latency. (The tile intrinsics take literal registers,
// hence the macros.)
void gram_group(const uint16_t* hi, const uint16_t* lo2, const uint32_t* bt, float* Q, int64_t Rp, int64_t cb,
                int64_t rb0, int nr, int nr_lo, int64_t n_ks, int64_t DC, bool first) {
  auto q = [&](int r) { return Q + ((rb0 + r) * 16) * Rp + cb * 16; };
#define EF_Q_LOAD(I)                \
  if (nr > I) {                     \
    if (first)                      \
      _tile_zero(I);                \
    else                            \
      _tile_loadd(I, q(I), Rp * 4); \
  }
  EF_Q_LOAD(0) EF_Q_LOAD(1) EF_Q_LOAD(2)
#undef EF_Q_LOAD
#define EF_GRAM_ROW(I, A, B)                                   \
  if (rows > I) {                                              \
    _tile_loadd(A, a + (rb0 + I) * 16 * DC + ks * 32, DC * 2); \
    _tile_dpbf16ps(I, A, B);                                   \
  }
  const int64_t n_steps = nr_lo > 0 ? 2 * n_ks : n_ks;
  for (int64_t step = 0; step < n_steps; step += 2)
    for (int h = 0; h < 2 && step + h < n_steps; ++h) {
      const int64_t s = step + h, ks = s % n_ks;
      const uint16_t* a = s < n_ks ? hi : lo2;
      const int rows = s < n_ks ? nr : nr_lo;
      if (h == 0) {
        _tile_loadd(6, bt + (ks * 16) * Rp + cb * 16, Rp * 4);
        EF_GRAM_ROW(0, 3, 6) EF_GRAM_ROW(1, 4, 6) EF_GRAM_ROW(2, 5, 6)
      } else {
        _tile_loadd(7, bt + (ks * 16) * Rp + cb * 16, Rp * 4);
        EF_GRAM_ROW(0, 3, 7) EF_GRAM_ROW(1, 4, 7) EF_GRAM_ROW(2, 5, 7)
      }
    }
#undef EF_GRAM_ROW
#define EF_Q_STORE(I) \
  if (nr > I) _tile_stored(I, q(I), Rp * 4);
  EF_Q_STORE(0) EF_Q_STORE(1) EF_Q_STORE(2)
#undef EF_Q_STORE
}

// G = (Q + Q^T) / 2 for Q [Rp][Rp] (Rp a multiple of 16), block by block through register transposes,
// but for the blocks of two exact-row blocks (from row Ph on), which are not computed.
void symmetrize(const float* Q, int64_t Rp, int64_t Ph, float* G) {
  __m512 t[16];
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t rb = 0; rb < Rp; rb += 16)
    for (int64_t cb = 0; cb < Rp; cb += 16) {
      if (rb >= Ph && cb >= Ph) continue;
      for (int i = 0; i < 16; ++i) t[i] = _mm512_loadu_ps(Q + (cb + i) * Rp + rb);  // block (cb, rb)
      transpose_lanes(t);                                                            // -> (rb, cb) of Q^T
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_ps(G + (rb + i) * Rp + cb,
                         _mm512_mul_ps(half, _mm512_add_ps(_mm512_loadu_ps(Q + (rb + i) * Rp + cb), t[i])));
    }
}

// bt[p][r] = the u32 pair (hi[r][2p], hi[r][2p + 1]) for p < n_pairs, r < Rp: Hi^T in the tile layout.
void transpose_pairs(const uint16_t* hi, int64_t Rp, int64_t DC, int64_t n_pairs, uint32_t* bt) {
  const uint32_t* src = reinterpret_cast<const uint32_t*>(hi);  // [Rp][DC / 2]
  __m512 r[16];
  for (int64_t r0 = 0; r0 < Rp; r0 += 16)
    for (int64_t p0 = 0; p0 < n_pairs; p0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(reinterpret_cast<const float*>(src + (r0 + i) * (DC / 2) + p0));
      transpose_lanes(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(bt + (p0 + j) * Rp + r0), r[j]);
    }
}

struct AmxScratch {
  Prefetcher next;       // the next work item's inputs
  Buf<uint16_t> zp;      // z of the work item [n][kTile][Hp]
  Buf<float> rf;         // one head's pass, projected [kTile][DC]
  Buf<uint16_t> hi, lo2; // per token rows [kTile][Rp][DC]
  Buf<uint32_t> bt;      // one token's Hi^T [DC / 2][Rp]
  Buf<float> q;          // per token accumulators [kTile][Rp][Rp]
  Buf<float> dir;        // per token centred direction [kTile][D] (gathered)
  Buf<float> g;          // one token's Gram (Q + Q^T) / 2 [Rp][Rp]
  Buf<float> tok_dots;   // one token's dots [NM][W] (at most kMaxRows^2), copied out with streaming stores
};

// bfloat16 inputs only (In = Bf16); signature of fused_attribution (fused_attribution.h).
void fused_attribution_amx(const FusedParams<Bf16>& p) {
  const uint16_t* z = p.z;
  const uint16_t* W_O = p.W_O;
  const uint16_t* directions = p.directions;
  const float* scale = p.scale;
  const int64_t* writers = p.writers;
  const uint16_t* extra = p.extra;
  const int64_t* direction_ids = p.direction_ids;
  const int64_t* incorrect_ids = p.incorrect_ids;
  const int64_t n_tokens = p.n_tokens, n_heads = p.n_heads, d_head = p.d_head, d_model = p.d_model,
                n_dirs = p.n_dirs, n_writers = p.n_writers, n_extra = p.n_extra;
  const bool center = p.center;
  float* dla = p.dla;
  float* dots = p.dots;
  float* norms = p.norms;
  const int n_threads = p.n_threads, chunk_cols = p.chunk_cols;  // tile_tokens: not used here
  using In = Bf16;
  const int64_t T_ = n_tokens, N = n_heads, H = d_head, D = d_model, K = n_dirs, W = n_writers,
                M = n_extra, NM = N + M;
  if (T_ <= 0 || N <= 0 || H <= 0 || D <= 0) return;
  const bool gathered = direction_ids != nullptr;
  const int64_t Kd = gathered ? 1 : K;  // directions per token, two rows each (hi, lo)
  const int64_t R = NM + 2 * Kd, Rp = round_up(R, 16);
  const int64_t Ph = round_up(N, 16);   // rows from Ph on are exact in bf16 (no lo)
  const int64_t Hp = round_up(H, 32), n_ks_h = Hp / 32;
  const int64_t Dp = round_up(D, 32);
  const int64_t DC = std::min(Dp, round_up(chunk_cols > 0 ? chunk_cols : kChunk, 32));
  const int64_t n_jb = Dp / 16;  // 16-column blocks of the projection
  const int64_t n_tiles = (T_ + kTile - 1) / kTile;
  const int64_t dir0 = NM;       // first direction row: direction k's parts are rows dir0 + 2k, + 1

  // W_O in the tile layout: Wv[n][jb][ks] = 16 pairs x 16 columns x 2 (zero past H and D).
  Buf<uint16_t> wv(static_cast<size_t>(N * n_jb * n_ks_h * 512));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t jb = 0; jb < n_jb; ++jb)
      for (int64_t ks = 0; ks < n_ks_h; ++ks) {
        uint16_t* t = wv.get() + ((n * n_jb + jb) * n_ks_h + ks) * 512;
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t c = 0; c < 16; ++c)
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t k = ks * 32 + 2 * p + e, d = jb * 16 + c;
              t[(p * 16 + c) * 2 + e] = (k < H && d < D) ? W_O[(n * H + k) * D + d] : uint16_t(0);
            }
      }
  // Fixed directions: centred in fp32 once, split per pass like the gathered ones.
  Buf<float> fixed = gathered ? Buf<float>() : fixed_directions<In>(directions, K, D, center);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  bool in_order = true;  // writers = heads 0 .. W - 1: a dots row is a row of the Gram
  for (int64_t p = 0; p < W; ++p) in_order = in_order && writers[p] == p;

  // A token's dots [NM][W] are one contiguous block of the output: built in scratch and copied with
  // streaming stores (stream_copy).
  const int nthr = resolve_threads(n_threads, n_tiles);
  Vec<AmxScratch> scratch(nthr);
  for (auto& s : scratch) {
    s.zp = Buf<uint16_t>(static_cast<size_t>(N * kTile * Hp));
    s.rf = Buf<float>(static_cast<size_t>(kTile * DC));
    s.hi = Buf<uint16_t>(static_cast<size_t>(kTile * Rp * DC));
    s.lo2 = Buf<uint16_t>(static_cast<size_t>(kTile * Rp * DC));
    s.bt = Buf<uint32_t>(static_cast<size_t>(DC / 2 * Rp));
    s.q = Buf<float>(static_cast<size_t>(kTile * Rp * Rp));
    if (gathered) s.dir = Buf<float>(static_cast<size_t>(kTile * D));
    s.next.spans.reserve(2 * kTile + 2);
    s.g = Buf<float>(static_cast<size_t>(Rp * Rp));
    s.tok_dots = Buf<float>(static_cast<size_t>(NM * W));
    // rows past R (and z past H, rows past the last token) stay zero
    std::fill(s.zp.get(), s.zp.get() + N * kTile * Hp, uint16_t(0));
    std::fill(s.hi.get(), s.hi.get() + kTile * Rp * DC, uint16_t(0));
    std::fill(s.lo2.get(), s.lo2.get() + kTile * Rp * DC, uint16_t(0));
  }

#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
#ifdef _OPENMP
    AmxScratch& s = scratch[omp_get_thread_num()];
#else
    AmxScratch& s = scratch[0];
#endif
    configure_tiles();
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      if (nonfinite_found(p.nonfinite)) continue;
      const int64_t t0 = ti * kTile, nt = std::min<int64_t>(kTile, T_ - t0);
      prefetch_tile_inputs<In>(s.next, z, extra, directions, direction_ids, incorrect_ids, t0 + nthr * kTile, kTile,
                               T_, N * H, M, D);
      s.next.start(static_cast<size_t>((Dp + DC - 1) / DC * N));
      uint16_t* zp = s.zp.get();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < kTile; ++i) {
          uint16_t* dst = zp + (n * kTile + i) * Hp;
          copy_pad_u16(i < nt ? z + ((t0 + i) * N + n) * H : nullptr, i < nt ? H : 0, Hp, dst);
        }
      if (gathered)
        for (int64_t i = 0; i < nt; ++i)
          token_dir<In>(directions, D, direction_ids, incorrect_ids, t0 + i, center, s.dir.get() + i * D);
      // a bad value: no output is returned, so the item's work is skipped
      if (nonfinite_item<In>(p.nonfinite, z, N * H, extra, M * D, t0, nt)) continue;

      for (int64_t c0 = 0; c0 < Dp; c0 += DC) {
        const bool first = c0 == 0;
        const int64_t dc = std::min(DC, Dp - c0);      // columns of the pass (a multiple of 32)
        const int64_t len = std::max<int64_t>(0, std::min(dc, D - c0));  // real ones
        const int64_t nb = dc / 16;
        // project: every head's pass for the work item's 32 tokens, in 2 x 2 blocks of tiles (two
        // 16-token tiles x two 16-column blocks: a W_O tile serves both token tiles, and four
        // accumulators keep the tile unit busy while each waits for its previous product), then split
        // into the tokens' rows
        for (int64_t n = 0; n < N; ++n) {
          s.next.step();
          const uint16_t* za = zp + n * kTile * Hp;
          for (int64_t b0 = 0; b0 < nb; b0 += 2) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const uint16_t* wb = wv.get() + ((n * n_jb + c0 / 16 + b0) * n_ks_h) * 512;
            for (int64_t ks = 0; ks < n_ks_h; ++ks) {
              _tile_loadd(4, za + ks * 32, Hp * 2);
              _tile_loadd(5, za + 16 * Hp + ks * 32, Hp * 2);
              _tile_loadd(6, wb + ks * 512, 64);
              _tile_loadd(7, wb + (n_ks_h + ks) * 512, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
            float* rf = s.rf.get() + b0 * 16;  // [kTile][DC]
            _tile_stored(0, rf, DC * 4);
            _tile_stored(1, rf + 16, DC * 4);
            _tile_stored(2, rf + 16 * DC, DC * 4);
            _tile_stored(3, rf + 16 * DC + 16, DC * 4);
          }
          for (int64_t i = 0; i < nt; ++i) {
            uint16_t* hrow = s.hi.get() + (i * Rp + n) * DC;
            uint16_t* lrow = s.lo2.get() + (i * Rp + n) * DC;
            for (int64_t d = 0; d < dc; d += 32) split_store(s.rf.get() + i * DC + d, hrow + d, lrow + d);
          }
        }
        // the other rows of the pass: extra nodes (exact in bf16) and the directions
        for (int64_t i = 0; i < nt; ++i) {
          uint16_t* hbase = s.hi.get() + i * Rp * DC;
          for (int64_t m = 0; m < M; ++m)
            copy_pad_u16(extra + ((t0 + i) * M + m) * D + c0, len, dc, hbase + (N + m) * DC);
          for (int64_t k = 0; k < Kd; ++k) {
            const float* src = (gathered ? s.dir.get() + i * D : fixed.get() + k * D) + c0;
            uint16_t* h = hbase + (dir0 + 2 * k) * DC;
            for (int64_t d = 0; d < dc; d += 32)
              split_exact_rows(src + std::min(d, len), len - d, h + d, h + DC + d);
          }
        }
        // Gram per token: Q += Hi Hi^T + 2 Lo Hi^T over the pass
        const int64_t nrb = Rp / 16, nhb = Ph / 16;
        for (int64_t i = 0; i < nt; ++i) {
          const uint16_t* hi = s.hi.get() + i * Rp * DC;
          const uint16_t* lo2 = s.lo2.get() + i * Rp * DC;
          transpose_pairs(hi, Rp, DC, dc / 2, s.bt.get());
          float* Q = s.q.get() + i * Rp * Rp;
          auto gram_rows = [&](int64_t cb, int64_t rb0, int64_t nr, int64_t nr_lo) {
            gram_group(hi, lo2, s.bt.get(), Q, Rp, cb, rb0, static_cast<int>(nr), static_cast<int>(nr_lo), dc / 32, DC,
                       first);
          };
          for (int64_t cb = 0; cb < nrb; ++cb) {
            if (cb < nhb) {  // a column block of heads: every row block
              for (int64_t rb0 = 0; rb0 < nrb; rb0 += kGroup) {
                const int64_t nr = std::min<int64_t>(kGroup, nrb - rb0);
                gram_rows(cb, rb0, nr, std::max<int64_t>(0, std::min(nr, nhb - rb0)));
              }
              continue;
            }
            // exact columns: the head row blocks, and the diagonal block (the exact rows' norms), in
            // the last group of heads where it follows it and there is room
            const bool joined = cb == nhb && nhb % kGroup != 0;
            for (int64_t rb0 = 0; rb0 < nhb; rb0 += kGroup) {
              const int64_t nr = std::min<int64_t>(kGroup, nhb - rb0);
              gram_rows(cb, rb0, nr + (joined && rb0 + nr == nhb ? 1 : 0), nr);
            }
            if (!joined) gram_rows(cb, cb, 1, 0);
          }
        }
      }

      // outputs: Gram = (Q + Q^T) / 2
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i;
        const float* Q = s.q.get() + i * Rp * Rp;
        float* G = s.g.get();
        symmetrize(Q, Rp, Ph, G);
        auto gram = [&](int64_t a, int64_t b) { return G[a * Rp + b]; };
        for (int64_t a = 0; a < NM; ++a) norms[t * NM + a] = Q[a * Rp + a];
        if (W > 0) {  // (no writers: no dots, and no scratch for them)
          for (int64_t a = 0; a < NM; ++a) {
            float* dst = s.tok_dots.get() + a * W;
            if (in_order)
              std::memcpy(dst, G + a * Rp, sizeof(float) * W);
            else
              for (int64_t p = 0; p < W; ++p) dst[p] = gram(a, writers[p]);
          }
          check_outputs(p.out_nonfinite, s.tok_dots.get(), NM * W, kNonfiniteDots);
          stream_copy(s.tok_dots.get(), NM * W, dots + t * NM * W);
        }
        check_outputs(p.out_nonfinite, norms + t * NM, NM, kNonfiniteNorms);
        const float st = scale[t];
        if (gathered) {
          const bool missing = no_target(direction_ids, incorrect_ids, t);
          for (int64_t n = 0; n < N; ++n) dla[t * N + n] = missing ? nan : (gram(n, dir0) + gram(n, dir0 + 1)) / st;
        } else {
          for (int64_t n = 0; n < N; ++n)
            for (int64_t k = 0; k < K; ++k)
              dla[(t * N + n) * K + k] = (gram(n, dir0 + 2 * k) + gram(n, dir0 + 2 * k + 1)) / st;
        }
        check_dla_outputs(p.out_nonfinite, dla, gathered ? N : N * K, t, 1, direction_ids, incorrect_ids);
      }
      _mm_sfence();  // the streamed outputs are visible to every thread after the loop's barrier
    }
    _tile_release();
  }
}

// Rows per token of the Gram (heads, extra nodes, directions) above which the AVX-512 kernel runs
// instead: the accumulators grow with their square (a fixed set of many directions).
constexpr int64_t kMaxRows = 256;

void fused_attribution_bf16(const FusedParams<Bf16>& p) {
  const int64_t rows = p.n_heads + p.n_extra + 2 * (p.direction_ids ? 1 : p.n_dirs);
  auto fn = rows <= kMaxRows ? &fused_attribution_amx : avx512_bf16::kernel_table().bf16.fused_attribution;
  fn(p);
}

}  // namespace

const Kernels& kernel_table() {
  static const Kernels k = [] {
    Kernels t = avx512_bf16::kernel_table();
    t.bf16.fused_attribution = &fused_attribution_bf16;
    // the DLA-only kernels compiled for this path: bf16 and fp32 head-space directions on the tile unit
    t.bf16.dla_fixed = &dla_fixed<Bf16>;
    t.bf16.dla_gathered = &dla_gathered<Bf16>;
    t.bf16.build_dla_table = &build_dla_table<Bf16>;
    t.bf16.fill_dla_table_rows = &fill_dla_table_rows<Bf16>;
    t.f32.dla_fixed = &dla_fixed<Native<float>>;
    t.f32.dla_gathered = &dla_gathered<Native<float>>;
    t.f32.build_dla_table = &build_dla_table<Native<float>>;
    t.f32.fill_dla_table_rows = &fill_dla_table_rows<Native<float>>;
    return t;
  }();
  return k;
}

}  // namespace EF_ISA
}  // namespace ef
