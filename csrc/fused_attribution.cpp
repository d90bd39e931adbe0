// CPU kernel of the fused attribution (see fused_attribution.h for the contract).
//
// Work item = a tile of kTile consecutive tokens (fixed tiling from token 0, OpenMP static schedule).
// Per tile, in a per-thread buffer:
//   1. pack z of the tile head-major, zero-padded to a multiple of MR tokens: Zp[N][H][TBP];
//   2. project: R[tt][n][:] = z[t, n, :] @ W_O[n] with a register-blocked micro-kernel (MR tokens x
//      NR SIMD vectors of d_model) on W_O packed once into contiguous column panels, so each panel
//      is loaded once per MR tokens and reused from L1 across the tile; no [T, N, d_model] array is ever formed;
//   3. per token: DLA against the (centred) direction(s), dots of every node with every writer and
//      the squared norms, with a register-blocked dot micro-kernel (4 rows x 3 rows).
// Every output element is reduced in an order fixed by the shapes alone, so the result does not
// depend on the number of threads.
#include "fused_attribution.h"
#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef EF_CPU_ARCH_NAME
#define EF_CPU_ARCH_NAME "unknown"
#endif
#ifndef EF_OPENMP_LINKED
#define EF_OPENMP_LINKED 0
#endif

namespace ef {
namespace {

using namespace detail;

// Default tokens per work item (a multiple of MR). R of a tile: kTile * N * d_model * sizeof(T).
constexpr int kDefaultTile = 12;


template <typename T>
struct Scratch {
  Buf<T> zp, r, dvec;
  std::vector<const T*> nodes, writer_rows, dir_row;
};

}  // namespace

template <typename T>
void fused_attribution(const T* z, const T* W_O, const T* directions, const T* scale,
                       const int64_t* writers, const T* extra, const int64_t* direction_ids,
                       const int64_t* incorrect_ids, int64_t n_tokens, int64_t n_heads,
                       int64_t d_head, int64_t d_model, int64_t n_dirs, int64_t n_writers,
                       int64_t n_extra, bool center, T* dla, T* dots, T* norms, int n_threads,
                       int tile_tokens) {
  const int64_t T_ = n_tokens, N = n_heads, H = d_head, D = d_model, K = n_dirs, W = n_writers,
                M = n_extra, NM = N + M;
  if (T_ <= 0 || N <= 0 || H <= 0 || D <= 0) return;
  constexpr int L = Simd<T>::L;
  constexpr int64_t BW = NR * L;  // columns per projection micro-kernel
  const int64_t Dp = (D + BW - 1) / BW * BW;
  int64_t tile = tile_tokens > 0 ? tile_tokens : kDefaultTile;
  tile = (tile + MR - 1) / MR * MR;
  const int64_t TBP = tile;  // padded tokens per tile (multiple of MR)
  const int64_t n_tiles = (T_ + tile - 1) / tile;
  const bool gathered = direction_ids != nullptr;

  // W_O packed into column panels, zero-padded to Dp columns: Wpk[n][jb][k][0 .. BW). A panel
  // (H x BW) is contiguous, so it stays in L1 while it is reused across the tile's token blocks (a
  // row stride of d_model would map the panel's rows onto few cache sets). Packed once per call.
  const int64_t n_jb = Dp / BW;
  Buf<T> wpk(static_cast<size_t>(N * H * Dp));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t jb = 0; jb < n_jb; ++jb)
      for (int64_t k = 0; k < H; ++k) {
        const T* src = W_O + (n * H + k) * D + jb * BW;
        T* dst = wpk.get() + ((n * n_jb + jb) * H + k) * BW;
        const int64_t nc = std::min<int64_t>(BW, D - jb * BW);
        std::memcpy(dst, src, sizeof(T) * nc);
        std::fill(dst + nc, dst + BW, T(0));
      }
  const T* Wp = wpk.get();
  // Fixed mode: the K directions, centred once.
  Buf<T> cdirs;
  const T* C = directions;
  if (!gathered && center) {
    cdirs = Buf<T>(static_cast<size_t>(K * D));
    std::memcpy(cdirs.get(), directions, sizeof(T) * K * D);
    for (int64_t k = 0; k < K; ++k) center_inplace(cdirs.get() + k * D, D);
    C = cdirs.get();
  }

  const int nthr = resolve_threads(n_threads, n_tiles);

  // Per-thread scratch, allocated here so no allocation (or exception) happens in the parallel region.
  std::vector<Scratch<T>> scratch(nthr);
  for (auto& s : scratch) {
    s.zp = Buf<T>(static_cast<size_t>(N * H * TBP));
    s.r = Buf<T>(static_cast<size_t>(TBP * N * Dp));
    s.dvec = Buf<T>(static_cast<size_t>(D));
    s.nodes.resize(NM);
    s.writer_rows.resize(std::max<int64_t>(W, 1));
    s.dir_row.resize(K);
    if (!gathered)
      for (int64_t k = 0; k < K; ++k) s.dir_row[k] = C + k * D;
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();

#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
#ifdef _OPENMP
    Scratch<T>& s = scratch[omp_get_thread_num()];
#pragma omp for schedule(static)
#else
    Scratch<T>& s = scratch[0];
#endif
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      const int64_t t0 = ti * tile;
      const int64_t nt = std::min<int64_t>(tile, T_ - t0);
      const int64_t ntp = (nt + MR - 1) / MR * MR;  // token rows actually projected
      T* __restrict zp = s.zp.get();
      T* __restrict R = s.r.get();

      // 1. pack z: Zp[n][k][i] = z[t0 + i, n, k], zero for padded tokens.
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < H; ++k) {
          T* dst = zp + (n * H + k) * TBP;
          for (int64_t i = 0; i < nt; ++i) dst[i] = z[((t0 + i) * N + n) * H + k];
          for (int64_t i = nt; i < ntp; ++i) dst[i] = T(0);
        }

      // 2. project: R[i][n][:] = sum_k Zp[n][k][i] * W_O[n][k][:].
      for (int64_t n = 0; n < N; ++n)
        for (int64_t jb = 0; jb < Dp; jb += BW)
          for (int64_t ib = 0; ib < ntp; ib += MR)
            project_block<T>(zp + n * H * TBP + ib, TBP, Wp + (n * n_jb + jb / BW) * H * BW, BW,
                             H, R + (ib * N + n) * Dp + jb, N * Dp);

      // 3. per token: DLA, dots, norms.
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i;
        const T* Rt = R + i * N * Dp;
        for (int64_t n = 0; n < N; ++n) s.nodes[n] = Rt + n * Dp;
        for (int64_t m = 0; m < M; ++m) s.nodes[N + m] = extra + (t * M + m) * D;
        for (int64_t w = 0; w < W; ++w) s.writer_rows[w] = Rt + writers[w] * Dp;
        const T st = scale[t];

        if (gathered) {
          T* out = dla + t * N;
          const int64_t id = direction_ids[t];
          const int64_t inc = incorrect_ids ? incorrect_ids[t] : 0;
          if (id < 0 || inc < 0) {
            for (int64_t n = 0; n < N; ++n) out[n] = nan;
          } else {
            T* dv = s.dvec.get();
            const T* row = directions + id * D;
            if (incorrect_ids) {
              const T* row2 = directions + inc * D;
              for (int64_t d = 0; d < D; ++d) dv[d] = row[d] - row2[d];
            } else {
              std::memcpy(dv, row, sizeof(T) * D);
            }
            if (center) center_inplace(dv, D);
            const T* dptr = dv;
            dot_block<T>(s.nodes.data(), N, &dptr, 1, D, out, 1, 1);
            for (int64_t n = 0; n < N; ++n) out[n] = out[n] / st;
          }
        } else {
          T* out = dla + t * N * K;
          dot_block<T>(s.nodes.data(), N, s.dir_row.data(), K, D, out, K, 1);
          for (int64_t e = 0; e < N * K; ++e) out[e] = out[e] / st;
        }

        if (W > 0) dot_block<T>(s.nodes.data(), NM, s.writer_rows.data(), W, D, dots + t * NM * W, W, 1);
        T* nrm = norms + t * NM;
        for (int64_t a = 0; a < NM; ++a) nrm[a] = sumsq<T>(s.nodes[a], D);
      }
    }
  }
}

template void fused_attribution<float>(const float*, const float*, const float*, const float*,
                                       const int64_t*, const float*, const int64_t*, const int64_t*,
                                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                       bool, float*, float*, float*, int, int);
template void fused_attribution<double>(const double*, const double*, const double*, const double*,
                                        const int64_t*, const double*, const int64_t*,
                                        const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, bool, double*, double*, double*, int, int);

bool openmp_enabled() {
#if defined(_OPENMP) && EF_OPENMP_LINKED
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

const char* cpu_arch() { return EF_CPU_ARCH_NAME; }

const char* simd_path() {
#if defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

int default_tile_tokens() { return kDefaultTile; }

}  // namespace ef
