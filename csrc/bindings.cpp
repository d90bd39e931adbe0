// pybind11 module erasure_fast._C: typed entry points of the fused attribution kernel.
//
// Every entry fills its kernel's params struct (fused_attribution.h, dla_only.h, scan_aggregates.h)
// from the numpy arguments in one function (fused_params, dla_fixed_params, ..., pair_stats_params),
// which is also where every argument check of the C++ path lives (defence in depth:
// contract.validate() checks the public API's input first, but _C can be called directly). The
// kernels trust their params.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "output_buffers.h"
#include "scratch_pool.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifndef EF_CPU_ARCH_NAME
#define EF_CPU_ARCH_NAME "unknown"
#endif
#ifndef EF_OPENMP_LINKED
#define EF_OPENMP_LINKED 0
#endif

namespace py = pybind11;

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;
using IdArr = py::array_t<int64_t, py::array::c_style>;

std::string shape_of(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + "]";
}

[[noreturn]] void fail(const std::string& msg) { throw py::value_error("erasure_fast._C: " + msg); }

// erasure_fast._C.NonFiniteInput (a ValueError): a call with check_finite=True found a NaN or an
// infinity in W_O or a row of directions it reads (before its kernel ran), or its kernel read one in z
// or extra_nodes (its outputs are dropped).
struct NonFiniteInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// erasure_fast._C.NonFiniteOutput (a ValueError): a kernel called with check_outputs=True wrote a NaN
// or an infinity where its finite inputs define the value (the accumulation type overflowed). The
// message is the first such output of dla, dots, norms; the outputs are dropped.
struct NonFiniteOutput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What a kernel reported: its activations (p.nonfinite) first, then its outputs (p.out_nonfinite).
void raise_if_nonfinite(unsigned found, unsigned out_found = 0) {
  if (found & ef::kNonfiniteZ) throw NonFiniteInput("z contains non-finite values");
  if (found & ef::kNonfiniteExtra) throw NonFiniteInput("extra_nodes contains non-finite values");
  if (found & ef::kNonfiniteW_O) throw NonFiniteInput("W_O contains non-finite values");
  if (found & ef::kNonfiniteDirections) throw NonFiniteInput("directions contains non-finite values");
  if (out_found & ef::kNonfiniteDla) throw NonFiniteOutput("dla");
  if (out_found & ef::kNonfiniteDots) throw NonFiniteOutput("dots");
  if (out_found & ef::kNonfiniteNorms) throw NonFiniteOutput("norms");
}

void check_ids(const char* name, const IdArr& ids, int64_t T, int64_t K) {
  if (ids.ndim() != 1 || ids.shape(0) != T)
    fail(std::string(name) + " must have shape [T]=[" + std::to_string(T) + "], got " + shape_of(ids));
  const int64_t* p = ids.data();
  for (int64_t t = 0; t < T; ++t)
    if (p[t] < -1 || p[t] >= K)
      fail(std::string(name) + " must lie in [-1, " + std::to_string(K) + ") (-1 = no target), got " +
           std::to_string(p[t]) + " at token " + std::to_string(t));
}

struct Dims {
  int64_t T, N, H, D, K;
};

template <typename In>
using InArr = Arr<typename In::storage>;

// The weights' check of a call made with check_finite, before its kernel runs (weight_checks.h): W_O
// and the rows of directions it reads (ids null: every row); NonFiniteInput naming the first bad one.
template <typename In>
void check_weights(const InArr<In>& W_O, const InArr<In>& directions, const int64_t* ids, const int64_t* inc,
                   int64_t n_tokens, int n_threads) {
  ef::WeightCheckParams<In> w;
  w.W_O = W_O.data();
  w.n_wo = static_cast<int64_t>(W_O.size());
  w.directions = directions.data();
  w.n_dirs = directions.shape(0);
  w.d_model = directions.shape(1);
  w.direction_ids = ids;
  w.incorrect_ids = inc;
  w.n_tokens = n_tokens;
  w.n_threads = n_threads;
  unsigned found = 0;
  {
    py::gil_scoped_release release;
    found = ef::kernels().typed<In>().nonfinite_weights(w);
  }
  raise_if_nonfinite(found);
}

template <typename In>
Dims check_dla_core(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
                    const Arr<typename In::acc>& scale) {
  using T = typename In::acc;
  if (z.ndim() != 3) fail("z must have shape [T, N, d_head], got " + shape_of(z));
  const int64_t T_ = z.shape(0), N = z.shape(1), H = z.shape(2);
  if (N < 1 || H < 1) fail("z must have at least one head and d_head >= 1, got " + shape_of(z));
  if (W_O.ndim() != 3 || W_O.shape(0) != N || W_O.shape(1) != H)
    fail("W_O must have shape [N, d_head, d_model]=[" + std::to_string(N) + ", " + std::to_string(H) +
         ", d_model], got " + shape_of(W_O));
  const int64_t D = W_O.shape(2);
  if (D < 1) fail("W_O has d_model = 0");
  if (directions.ndim() != 2 || directions.shape(1) != D)
    fail("directions must have shape [K, d_model]=[K, " + std::to_string(D) + "], got " +
         shape_of(directions));
  const int64_t K = directions.shape(0);
  if (K < 1) fail("directions has no rows (K = 0)");
  if (scale.ndim() != 1 || scale.shape(0) != T_)
    fail("scale must have shape [T]=[" + std::to_string(T_) + "], got " + shape_of(scale));
  const T* s = scale.data();
  for (int64_t t = 0; t < T_; ++t) {
    const T st = s[t];
    if (!(st > T(0)) || !std::isfinite(st))
      fail("scale must be finite and > 0 at every token, got " + std::to_string(st) +
           " at token " + std::to_string(t));
  }
  return Dims{T_, N, H, D, K};
}

// One fused_attribution call: its params (pointers into the arrays below and into the inputs) and
// its freshly allocated outputs.
template <typename In>
struct FusedCall {
  ef::FusedParams<In> p;
  py::array_t<typename In::acc> dla, dots, norms;
};

// Fills the params of one fused_attribution call from the numpy arguments, checking every one of
// them (the only place they are checked), and allocates the outputs.
template <typename In>
FusedCall<In> fused_params(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
                           const Arr<typename In::acc>& scale, const IdArr& writers,
                           const std::optional<InArr<In>>& extra,
                           const std::optional<IdArr>& direction_ids,
                           const std::optional<IdArr>& incorrect_ids, bool center, int n_threads,
                           int tile_tokens, int chunk_cols) {
  using T = typename In::acc;
  const Dims dims = check_dla_core<In>(z, W_O, directions, scale);
  const int64_t T_ = dims.T, N = dims.N, K = dims.K, D = dims.D;
  if (writers.ndim() != 1) fail("writers must have shape [W], got " + shape_of(writers));
  const int64_t W = writers.shape(0);
  {
    const int64_t* w = writers.data();
    for (int64_t i = 0; i < W; ++i)
      if (w[i] < 0 || w[i] >= N)
        fail("writers must be head indices in [0, " + std::to_string(N) + "), got " +
             std::to_string(w[i]) + " at position " + std::to_string(i));
  }
  FusedCall<In> c;
  ef::FusedParams<In>& p = c.p;
  if (extra) {
    if (extra->ndim() != 3 || extra->shape(0) != T_ || extra->shape(2) != D)
      fail("extra_nodes must have shape [T, M, d_model]=[" + std::to_string(T_) + ", M, " +
           std::to_string(D) + "], got " + shape_of(*extra));
    p.n_extra = extra->shape(1);
    p.extra = extra->data();
  }
  if (direction_ids) {
    check_ids("direction_ids", *direction_ids, T_, K);
    p.direction_ids = direction_ids->data();
  }
  if (incorrect_ids) {
    if (!direction_ids)
      fail("incorrect_ids needs direction_ids (logit difference is a gathered-mode option)");
    check_ids("incorrect_ids", *incorrect_ids, T_, K);
    p.incorrect_ids = incorrect_ids->data();
  }
  p.z = z.data();
  p.W_O = W_O.data();
  p.directions = directions.data();
  p.scale = scale.data();
  p.writers = writers.data();
  p.n_tokens = T_;
  p.n_heads = N;
  p.d_head = dims.H;
  p.d_model = D;
  p.n_dirs = K;
  p.n_writers = W;
  p.center = center;
  p.n_threads = n_threads;
  p.tile_tokens = tile_tokens;
  p.chunk_cols = chunk_cols;
  const int64_t M = p.n_extra;
  c.dla = ef::mapped_output<T>(p.direction_ids ? std::vector<py::ssize_t>{T_, N}
                                               : std::vector<py::ssize_t>{T_, N, K}, n_threads);
  c.dots = ef::mapped_output<T>({T_, N + M, W}, n_threads);
  c.norms = ef::mapped_output<T>({T_, N + M}, n_threads);
  p.dla = c.dla.mutable_data();
  p.dots = c.dots.mutable_data();
  p.norms = c.norms.mutable_data();
  return c;
}

template <typename In>
py::tuple run(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
              const Arr<typename In::acc>& scale, const IdArr& writers,
              const std::optional<InArr<In>>& extra,
              const std::optional<IdArr>& direction_ids, const std::optional<IdArr>& incorrect_ids,
              bool center, bool check_finite, bool check_outputs, int n_threads, int tile_tokens, int chunk_cols) {
  FusedCall<In> c = fused_params<In>(z, W_O, directions, scale, writers, extra, direction_ids,
                                     incorrect_ids, center, n_threads, tile_tokens, chunk_cols);
  if (check_finite)
    check_weights<In>(W_O, directions, c.p.direction_ids, c.p.incorrect_ids, c.p.n_tokens, n_threads);
  unsigned found = 0, out_found = 0;
  c.p.nonfinite = check_finite ? &found : nullptr;
  c.p.out_nonfinite = check_outputs ? &out_found : nullptr;
  {
    py::gil_scoped_release release;
    ef::kernels().typed<In>().fused_attribution(c.p);
  }
  raise_if_nonfinite(found, out_found);
  return py::make_tuple(c.dla, c.dots, c.norms);
}

template <typename In>
void def_entry(py::module_& m, const char* name, const char* dtype) {
  m.def(name, &run<In>, py::arg("z"), py::arg("W_O"), py::arg("directions"), py::arg("scale"),
        py::arg("writers"), py::arg("extra_nodes") = py::none(), py::arg("direction_ids") = py::none(),
        py::arg("incorrect_ids") = py::none(), py::arg("center") = true, py::arg("check_finite") = false,
        py::arg("check_outputs") = false, py::arg("n_threads") = 0, py::arg("tile_tokens") = 0,
        py::arg("chunk_cols") = 0,
        (std::string("Fused DLA + erasure dots on ") + dtype +
         " C-contiguous numpy arrays (bfloat16 / float16 as their uint16 bits, converted on load; "
         "accumulation and outputs in float64 for float64, else float32).\n\nz [T, N, H], W_O [N, H, D], directions [K, D], scale [T], writers [W] int64, "
         "extra_nodes [T, M, D] or None, direction_ids / incorrect_ids [T] int64 in [-1, K) or None "
         "(None = fixed-set mode). check_finite: W_O and the rows of directions the call reads (every row, "
         "or those the ids name) are checked before the kernel runs, z and extra_nodes as the kernel reads "
         "them; NonFiniteInput (a ValueError) for a NaN or an infinity. check_outputs: the kernel "
         "checks its outputs as it writes them and raises NonFiniteOutput (a ValueError; the message names "
         "the first of dla, dots, norms) where one is a NaN or an infinity, but for the DLA of a token "
         "without a target. n_threads <= 0: OpenMP default; tile_tokens / chunk_cols <= 0: default tile (tokens per work item) / d_model columns "
         "per pass.\n"
         "Returns (dla [T, N] or [T, N, K], dots [T, N + M, W], norms [T, N + M]).")
            .c_str());
}


// ---------------------------------------------------------------------------------------------
// DLA-only entry points (dla_only.h). Same checks as `run` for the shared arguments.

ef::DlaMethod parse_method(const std::string& m) {
  if (m == "auto") return ef::DlaMethod::kAuto;
  if (m == "unique") return ef::DlaMethod::kUnique;
  if (m == "table") return ef::DlaMethod::kTable;
  fail("method must be 'auto', 'unique' or 'table', got '" + m + "'");
}

const char* method_name(int m) {
  return m == static_cast<int>(ef::DlaMethod::kTable) ? "table" : "unique";
}

py::dict info_dict(const ef::DlaRunInfo& info) {
  py::dict d;
  d["method"] = std::string(method_name(info.method));
  d["n_unique"] = info.n_unique;
  return d;
}

// One DLA-only call: its params and its freshly allocated outputs (norms: None when not wanted).
template <typename In>
struct DlaCall {
  ef::DlaParams<In> p;
  py::array_t<typename In::acc> dla;
  py::object norms = py::none();
};

// Fills what dla_fixed and dla_gathered share (checked by check_dla_core) and allocates dla with
// shape dla_shape and the optional norms [T, N].
template <typename In>
DlaCall<In> dla_core_params(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
                            const Arr<typename In::acc>& scale, const Dims& d, bool center,
                            bool want_norms, int n_threads, std::vector<py::ssize_t> dla_shape) {
  using T = typename In::acc;
  DlaCall<In> c;
  ef::DlaParams<In>& p = c.p;
  p.z = z.data();
  p.W_O = W_O.data();
  p.directions = directions.data();
  p.scale = scale.data();
  p.n_tokens = d.T;
  p.n_heads = d.N;
  p.d_head = d.H;
  p.d_model = d.D;
  p.n_dirs = d.K;
  p.center = center;
  p.n_threads = n_threads;
  c.dla = ef::mapped_output<T>(dla_shape, n_threads);
  p.dla = c.dla.mutable_data();
  if (want_norms) {
    py::array_t<T> norms = ef::mapped_output<T>({d.T, d.N}, n_threads);
    p.norms = norms.mutable_data();
    c.norms = norms;
  }
  return c;
}

// Fills and checks the params of one dla_fixed call (the only place they are checked).
template <typename In>
DlaCall<In> dla_fixed_params(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
                             const Arr<typename In::acc>& scale, bool center, bool want_norms,
                             int n_threads) {
  const Dims d = check_dla_core<In>(z, W_O, directions, scale);
  return dla_core_params<In>(z, W_O, directions, scale, d, center, want_norms, n_threads, {d.T, d.N, d.K});
}

// Fills and checks the params of one dla_gathered call (the only place they are checked).
template <typename In>
DlaCall<In> dla_gathered_params(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
                                const Arr<typename In::acc>& scale, const IdArr& direction_ids,
                                const std::optional<IdArr>& incorrect_ids, bool center,
                                const std::optional<Arr<typename In::acc>>& table,
                                const std::string& method, bool want_norms, int n_threads) {
  const Dims d = check_dla_core<In>(z, W_O, directions, scale);
  check_ids("direction_ids", direction_ids, d.T, d.K);
  if (incorrect_ids) check_ids("incorrect_ids", *incorrect_ids, d.T, d.K);
  const ef::DlaMethod m = parse_method(method);
  if (table) {
    if (table->ndim() != 3 || table->shape(0) != d.K || table->shape(1) != d.N ||
        table->shape(2) != d.H)
      fail("table must have shape [K, N, d_head]=[" + std::to_string(d.K) + ", " +
           std::to_string(d.N) + ", " + std::to_string(d.H) + "], got " + shape_of(*table));
  } else if (m == ef::DlaMethod::kTable) {
    fail("method 'table' needs a table (build one with build_dla_table)");
  }
  DlaCall<In> c = dla_core_params<In>(z, W_O, directions, scale, d, center, want_norms, n_threads, {d.T, d.N});
  c.p.direction_ids = direction_ids.data();
  c.p.incorrect_ids = incorrect_ids ? incorrect_ids->data() : nullptr;
  c.p.table = table ? table->data() : nullptr;
  c.p.method = m;
  return c;
}

template <typename In>
py::tuple run_dla_fixed(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
                        const Arr<typename In::acc>& scale, bool center, bool want_norms, bool check_finite,
                        bool check_outputs, int n_threads) {
  DlaCall<In> c = dla_fixed_params<In>(z, W_O, directions, scale, center, want_norms, n_threads);
  if (check_finite) check_weights<In>(W_O, directions, nullptr, nullptr, c.p.n_tokens, n_threads);
  unsigned found = 0, out_found = 0;
  c.p.nonfinite = check_finite ? &found : nullptr;
  c.p.out_nonfinite = check_outputs ? &out_found : nullptr;
  ef::DlaRunInfo info;
  {
    py::gil_scoped_release release;
    info = ef::kernels().typed<In>().dla_fixed(c.p);
  }
  raise_if_nonfinite(found, out_found);
  return py::make_tuple(c.dla, c.norms, info_dict(info));
}

template <typename In>
py::tuple run_dla_gathered(const InArr<In>& z, const InArr<In>& W_O, const InArr<In>& directions,
                           const Arr<typename In::acc>& scale, const IdArr& direction_ids,
                           const std::optional<IdArr>& incorrect_ids, bool center,
                           const std::optional<Arr<typename In::acc>>& table,
                           const std::string& method, bool want_norms, bool check_finite, bool check_outputs,
                           int n_threads) {
  DlaCall<In> c = dla_gathered_params<In>(z, W_O, directions, scale, direction_ids, incorrect_ids,
                                          center, table, method, want_norms, n_threads);
  if (check_finite)
    check_weights<In>(W_O, directions, c.p.direction_ids, c.p.incorrect_ids, c.p.n_tokens, n_threads);
  unsigned found = 0, out_found = 0;
  c.p.nonfinite = check_finite ? &found : nullptr;
  c.p.out_nonfinite = check_outputs ? &out_found : nullptr;
  ef::DlaRunInfo info;
  {
    py::gil_scoped_release release;
    info = ef::kernels().typed<In>().dla_gathered(c.p);
  }
  raise_if_nonfinite(found, out_found);
  return py::make_tuple(c.dla, c.norms, info_dict(info));
}

// The weights of a DLA table: W_O [N, d_head, d_model], directions [K >= 1, d_model]; fills and
// checks the params both table entries share.
template <typename In>
ef::DlaTableParams<In> dla_table_params(const InArr<In>& W_O, const InArr<In>& directions, bool center,
                                        int n_threads) {
  if (W_O.ndim() != 3) fail("W_O must have shape [N, d_head, d_model], got " + shape_of(W_O));
  const int64_t N = W_O.shape(0), H = W_O.shape(1), D = W_O.shape(2);
  if (N < 1 || H < 1 || D < 1)
    fail("W_O must have at least one head, d_head >= 1 and d_model >= 1, got " + shape_of(W_O));
  if (directions.ndim() != 2 || directions.shape(1) != D)
    fail("directions must have shape [K, d_model]=[K, " + std::to_string(D) + "], got " +
         shape_of(directions));
  const int64_t K = directions.shape(0);
  if (K < 1) fail("directions has no rows (K = 0)");
  ef::DlaTableParams<In> p;
  p.W_O = W_O.data();
  p.directions = directions.data();
  p.n_heads = N;
  p.d_head = H;
  p.d_model = D;
  p.n_dirs = K;
  p.center = center;
  p.n_threads = n_threads;
  return p;
}

template <typename In>
py::array_t<typename In::acc> run_build_table(const InArr<In>& W_O, const InArr<In>& directions,
                                              bool center, int n_threads) {
  using T = typename In::acc;
  ef::DlaTableParams<In> p = dla_table_params<In>(W_O, directions, center, n_threads);
  py::array_t<T> table = ef::mapped_output<T>({p.n_dirs, p.n_heads, p.d_head}, n_threads);
  p.table = table.mutable_data();
  {
    py::gil_scoped_release release;
    ef::kernels().typed<In>().build_dla_table(p);
  }
  return table;
}

// Fills and checks the params of one fill_dla_table_rows call (the only place they are checked).
template <typename In>
ef::DlaTableParams<In> fill_rows_params(const InArr<In>& W_O, const InArr<In>& directions,
                                        const IdArr& rows, py::array& table, bool center, int n_threads) {
  using T = typename In::acc;
  ef::DlaTableParams<In> p = dla_table_params<In>(W_O, directions, center, n_threads);
  const int64_t N = p.n_heads, H = p.d_head, K = p.n_dirs;
  // written in place: the exact dtype and layout, never a converted copy
  if (!table.dtype().equal(py::dtype::of<T>()))
    fail(std::string("table must have dtype ") + (sizeof(T) == 8 ? "float64" : "float32"));
  if (!(table.flags() & py::array::c_style) || !table.writeable())
    fail("table must be a writable C-contiguous array");
  if (table.ndim() != 3 || table.shape(0) != K || table.shape(1) != N || table.shape(2) != H)
    fail("table must have shape [K, N, d_head]=[" + std::to_string(K) + ", " + std::to_string(N) +
         ", " + std::to_string(H) + "], got " + shape_of(table));
  if (rows.ndim() != 1) fail("rows must have shape [R], got " + shape_of(rows));
  const int64_t R = rows.shape(0);
  const int64_t* r = rows.data();
  for (int64_t i = 0; i < R; ++i)
    if (r[i] < 0 || r[i] >= K)
      fail("rows must lie in [0, " + std::to_string(K) + "), got " + std::to_string(r[i]) +
           " at position " + std::to_string(i));
  p.rows = r;
  p.n_rows = R;
  p.table = static_cast<T*>(table.mutable_data());
  return p;
}

template <typename In>
void run_fill_table_rows(const InArr<In>& W_O, const InArr<In>& directions, const IdArr& rows,
                         py::array table, bool center, int n_threads) {
  const ef::DlaTableParams<In> p = fill_rows_params<In>(W_O, directions, rows, table, center, n_threads);
  {
    py::gil_scoped_release release;
    ef::kernels().typed<In>().fill_dla_table_rows(p);
  }
}

template <typename In>
void def_dla(py::module_& m, const std::string& sfx, const char* dtype) {
  const std::string dt(dtype);
  m.def(("dla_fixed_" + sfx).c_str(), &run_dla_fixed<In>, py::arg("z"), py::arg("W_O"),
        py::arg("directions"), py::arg("scale"), py::arg("center") = true,
        py::arg("norms") = true, py::arg("check_finite") = false, py::arg("check_outputs") = false,
        py::arg("n_threads") = 0,
        ("DLA-only, fixed directions, on " + dt +
         " arrays: dla [T, N, K] = z . (W_O c(d_k)) / s, never forming a head's d_model output.\n"
         "norms=True also returns |r_n|^2 [T, N] (as z^T W_O W_O^T z). check_finite: W_O and the rows of "
         "directions the call reads are checked before the kernel runs, z as the kernel reads it; "
         "NonFiniteInput (a ValueError) for a NaN or an infinity. "
         "check_outputs: the kernel checks dla and norms as it writes them and raises NonFiniteOutput "
         "(a ValueError naming the first of dla, norms) for a NaN or an infinity. Returns "
         "(dla, norms or None, {'method', 'n_unique'}).")
            .c_str());
  m.def(("dla_gathered_" + sfx).c_str(), &run_dla_gathered<In>, py::arg("z"), py::arg("W_O"),
        py::arg("directions"), py::arg("scale"), py::arg("direction_ids"),
        py::arg("incorrect_ids") = py::none(), py::arg("center") = true,
        py::arg("table") = py::none(), py::arg("method") = "auto", py::arg("norms") = true,
        py::arg("check_finite") = false, py::arg("check_outputs") = false, py::arg("n_threads") = 0,
        ("DLA-only, gathered directions, on " + dt +
         " arrays: dla [T, N] (NaN where an id is -1) via the distinct (id, incorrect id) pairs "
         "of the call ('unique') or a prebuilt table [K, N, d_head] from build_dla_table "
         "('table'); 'auto' picks the table when one is given and the cost model prefers it. "
         "check_finite, check_outputs: as dla_fixed_* (the DLA of a token without a target is NaN, "
         "and not an error).\n"
         "Returns (dla, norms [T, N] or None, {'method', 'n_unique'}).")
            .c_str());
  m.def(("fill_dla_table_rows_" + sfx).c_str(), &run_fill_table_rows<In>, py::arg("W_O"),
        py::arg("directions"), py::arg("rows"), py::arg("table"), py::arg("center") = true,
        py::arg("n_threads") = 0,
        ("fills table[rows] in place (table [K, N, d_head] of the accumulation dtype, as "
         "build_dla_table_" + sfx + " would; other rows untouched): a lazily built table.")
            .c_str());
  m.def(("build_dla_table_" + sfx).c_str(), &run_build_table<In>, py::arg("W_O"),
        py::arg("directions"), py::arg("center") = true, py::arg("n_threads") = 0,
        ("table [K, N, d_head] (" + dt +
         "): table[k, n] = W_O[n] @ c(directions[k]), for dla_gathered_*(table=...).")
            .c_str());
}

// ---------------------------------------------------------------------------------------------
// Scan aggregation (scan_aggregates.h): one batch's histogram (added in place) and moments.

// What every scan-aggregation entry returns: the batch's count [rows, cols] int64 and mean / m2
// [rows, cols] float64 (rows: buckets or statistics, cols: series or pairs).
struct BatchMoments {
  py::array_t<int64_t> count;
  py::array_t<double> mean, m2;
  BatchMoments(int64_t rows, int64_t cols)
      : count(std::vector<py::ssize_t>{rows, cols}),
        mean(std::vector<py::ssize_t>{rows, cols}),
        m2(std::vector<py::ssize_t>{rows, cols}) {}
  py::tuple as_tuple() const { return py::make_tuple(count, mean, m2); }
  // the same arrays as [blocks, rows / blocks, cols] (rows a multiple of blocks)
  py::tuple as_tuple(int64_t blocks) const {
    const auto split = [&](const py::array& a) { return a.attr("reshape")(blocks, a.shape(0) / blocks, a.shape(1)); };
    return py::make_tuple(split(count), split(mean), split(m2));
  }
};

// An array the scan kernels read in place, with the kernel's dtype (never a silent converted copy),
// three dimensions and contiguous rows over the last two (only the token stride is free: a view such
// as dots[:, :n_nodes] of a larger array). Returns the token stride in elements.
template <typename T>
int64_t rows_in_place(const py::array& a, const std::string& name, const std::string& shape) {
  if (!a.dtype().equal(py::dtype::of<T>()))
    fail(name + " must have dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != 3) fail(name + " must have shape " + shape + ", got " + shape_of(a));
  const py::ssize_t item = static_cast<py::ssize_t>(sizeof(T));
  if ((a.shape(2) > 1 && a.strides(2) != item) || (a.shape(1) > 1 && a.strides(1) != a.shape(2) * item) ||
      a.strides(0) < 0 || a.strides(0) % item != 0 || (a.shape(0) > 1 && a.strides(0) < a.shape(1) * a.shape(2) * item))
    fail(name + " must have contiguous rows over its last two dimensions (any token stride), got strides " +
         std::to_string(a.strides(0)) + ", " + std::to_string(a.strides(1)) + ", " + std::to_string(a.strides(2)));
  return a.strides(0) / item;
}

// One series_stats_batch call: its params, the block table they point into and the outputs.
template <typename T>
struct SeriesCall {
  ef::SeriesStatsParams<T> p;
  std::vector<const T*> blocks;
  std::vector<int64_t> n_series, strides;
  std::unique_ptr<BatchMoments> out;
};

// Fills the params every series-statistics entry shares and checks them: the binning, the bucket ids
// [T] and the histogram [B, S, n_bins + 2] updated in place (this very array, never a converted
// copy); the blocks (c.blocks, c.n_series, c.strides) are already filled. Allocates the outputs.
template <typename T>
void series_common_params(SeriesCall<T>& c, const IdArr& bucket, int64_t T_, int64_t n_buckets, double lo,
                          double inv_width, int64_t n_bins, py::array& hist, int n_threads) {
  int64_t S = 0;
  for (int64_t n : c.n_series) S += n;
  if (n_buckets < 1) fail("n_buckets must be >= 1, got " + std::to_string(n_buckets));
  if (n_bins < 1) fail("n_bins must be >= 1, got " + std::to_string(n_bins));
  if (!std::isfinite(lo) || !std::isfinite(inv_width) || !(inv_width > 0))
    fail("lo must be finite and inv_width finite and > 0, got " + std::to_string(lo) + ", " +
         std::to_string(inv_width));
  if (bucket.ndim() != 1 || bucket.shape(0) != T_)
    fail("bucket must have shape [T]=[" + std::to_string(T_) + "], got " + shape_of(bucket));
  const int64_t* bp = bucket.data();
  for (int64_t t = 0; t < T_; ++t)
    if (bp[t] < 0 || bp[t] >= n_buckets)
      fail("bucket must lie in [0, " + std::to_string(n_buckets) + "), got " + std::to_string(bp[t]) +
           " at token " + std::to_string(t));
  if (!hist.dtype().equal(py::dtype::of<int64_t>()) || !(hist.flags() & py::array::c_style) ||
      !hist.writeable())
    fail("hist must be a writeable C-contiguous int64 array");
  if (hist.ndim() != 3 || hist.shape(0) != n_buckets || hist.shape(1) != S || hist.shape(2) != n_bins + 2)
    fail("hist must have shape [B, S, n_bins + 2]=[" + std::to_string(n_buckets) + ", " +
         std::to_string(S) + ", " + std::to_string(n_bins + 2) + "], got " + shape_of(hist));
  c.out = std::make_unique<BatchMoments>(n_buckets, S);
  ef::SeriesStatsParams<T>& p = c.p;
  p.blocks = c.blocks.data();
  p.n_series = c.n_series.data();
  p.token_stride = c.strides.data();
  p.n_blocks = static_cast<int>(c.blocks.size());
  p.bucket = bp;
  p.n_tokens = T_;
  p.n_buckets = n_buckets;
  p.lo = static_cast<T>(lo);
  p.inv_width = static_cast<T>(inv_width);
  p.n_bins = n_bins;
  p.hist = static_cast<int64_t*>(hist.mutable_data());
  p.count = c.out->count.mutable_data();
  p.mean = c.out->mean.mutable_data();
  p.m2 = c.out->m2.mutable_data();
  p.n_threads = n_threads;
}

// Fills and checks the params of one series_stats_batch call on values [T, S] (one block).
template <typename T>
std::unique_ptr<SeriesCall<T>> series_params(const Arr<T>& values, const IdArr& bucket, int64_t n_buckets,
                                             double lo, double inv_width, int64_t n_bins, py::array& hist,
                                             int n_threads) {
  if (values.ndim() != 2) fail("values must have shape [T, S], got " + shape_of(values));
  const int64_t T_ = values.shape(0), S = values.shape(1);
  auto c = std::make_unique<SeriesCall<T>>();
  c->blocks = {values.data()};
  c->n_series = {S};
  c->strides = {S};
  series_common_params<T>(*c, bucket, T_, n_buckets, lo, inv_width, n_bins, hist, n_threads);
  return c;
}

template <typename T>
py::tuple run_series_stats(const Arr<T>& values, const IdArr& bucket, int64_t n_buckets, double lo,
                           double inv_width, int64_t n_bins, py::array hist, int n_threads) {
  const auto c = series_params<T>(values, bucket, n_buckets, lo, inv_width, n_bins, hist, n_threads);
  {
    py::gil_scoped_release release;
    ef::kernels().scan<T>().series_stats_batch(c->p);
  }
  return c->out->as_tuple();
}

template <typename T>
void def_series_stats(py::module_& m, const char* name) {
  m.def(name, &run_series_stats<T>, py::arg("values"), py::arg("bucket"), py::arg("n_buckets"),
        py::arg("lo"), py::arg("inv_width"), py::arg("n_bins"), py::arg("hist"), py::arg("n_threads") = 0,
        "One batch of SeriesStats.update: values [T, S], bucket [T] int64 in [0, n_buckets), hist "
        "[n_buckets, S, n_bins + 2] int64 (finite values' bins added in place; bin = clamp(floor((v - lo) "
        "* inv_width), -1, n_bins) + 1 in the values' dtype). Returns the batch's (count [B, S] int64, "
        "mean [B, S] float64, m2 [B, S] float64) over finite values.");
}

// Ratio statistics (scan_aggregates.h, series_stats_batch with a divisor): the blocks are read in place, so each
// must already have the kernel's dtype (no silent copy) and rows [R_k, W] contiguous; only the token
// stride is free (a view such as dots[:, :n_nodes] of a larger array).
// Fills and checks the params of one ratio-statistics call (series_stats_batch over blocks with a
// divisor).
template <typename T>
std::unique_ptr<SeriesCall<T>> ratio_params(const std::vector<py::array>& blocks, const Arr<T>& divisor,
                                            const IdArr& bucket, int64_t n_buckets, double lo, double inv_width,
                                            int64_t n_bins, py::array& hist, int n_threads) {
  if (divisor.ndim() != 2) fail("divisor must have shape [T, W], got " + shape_of(divisor));
  const int64_t T_ = divisor.shape(0), W = divisor.shape(1);
  if (W < 1) fail("divisor must have at least one column, got " + shape_of(divisor));
  if (blocks.empty()) fail("blocks must hold at least one array");
  auto c = std::make_unique<SeriesCall<T>>();
  for (size_t k = 0; k < blocks.size(); ++k) {
    const py::array& a = blocks[k];
    const std::string name = "blocks[" + std::to_string(k) + "]";
    const int64_t stride = rows_in_place<T>(a, name, "[T, R, W]");
    if (a.shape(0) != T_ || a.shape(2) != W)
      fail(name + " must have shape [T, R, W]=[" + std::to_string(T_) + ", R, " + std::to_string(W) + "], got " +
           shape_of(a));
    c->blocks.push_back(static_cast<const T*>(a.data()));
    c->n_series.push_back(a.shape(1) * W);
    c->strides.push_back(stride);
  }
  series_common_params<T>(*c, bucket, T_, n_buckets, lo, inv_width, n_bins, hist, n_threads);
  c->p.divisor = divisor.data();
  c->p.n_div = W;
  return c;
}

template <typename T>
py::tuple run_ratio_stats(const std::vector<py::array>& blocks, const Arr<T>& divisor, const IdArr& bucket,
                          int64_t n_buckets, double lo, double inv_width, int64_t n_bins, py::array hist,
                          int n_threads) {
  const auto c = ratio_params<T>(blocks, divisor, bucket, n_buckets, lo, inv_width, n_bins, hist, n_threads);
  {
    py::gil_scoped_release release;
    ef::kernels().scan<T>().series_stats_batch(c->p);
  }
  return c->out->as_tuple();
}

template <typename T>
void def_ratio_stats(py::module_& m, const char* name) {
  m.def(name, &run_ratio_stats<T>, py::arg("blocks"), py::arg("divisor"), py::arg("bucket"),
        py::arg("n_buckets"), py::arg("lo"), py::arg("inv_width"), py::arg("n_bins"), py::arg("hist"),
        py::arg("n_threads") = 0,
        "One batch of SeriesStats.update_ratios: the series are the columns of blocks [T, R_k, W] (block "
        "after block, row-major), each divided by divisor [T, W] at its writer column (NaN where it is 0) "
        "before binning as series_stats_batch does; blocks are read in place (rows [R_k, W] contiguous, any "
        "token stride). hist [n_buckets, sum R_k * W, n_bins + 2] int64 is added in place. Returns "
        "(count, mean, m2) [B, S].");
}

// The per-pair ranking statistics (scan_aggregates.h, pair_stats_batch): histograms of the
// kPairStats statistics (SeriesStats of n_buckets position buckets, or of one) updated in place.
// Returns the histogram's bucket count (1 or n_buckets).
int64_t check_hist(const py::array& hist, const std::string& name, int64_t n_series, int64_t n_bins,
                   int64_t n_buckets) {
  if (!hist.dtype().equal(py::dtype::of<int64_t>()) || !(hist.flags() & py::array::c_style) ||
      !hist.writeable())
    fail(name + " must be a writeable C-contiguous int64 array");
  if (hist.ndim() != 3 || (hist.shape(0) != 1 && hist.shape(0) != n_buckets) || hist.shape(1) != n_series ||
      hist.shape(2) != n_bins + 2)
    fail(name + " must have shape [1 or n_buckets, P, n_bins + 2]=[1 or " + std::to_string(n_buckets) + ", " +
         std::to_string(n_series) + ", " + std::to_string(n_bins + 2) + "], got " + shape_of(hist));
  return hist.shape(0);
}

// One pair_stats_batch call: its params and what they point into that the caller does not own (the
// histogram pointers and the outputs).
template <typename T>
struct PairStatsCall {
  ef::PairStatsParams<T> p;
  std::vector<int64_t*> hist_ptrs;
  std::vector<int64_t> hist_buckets;
  BatchMoments out;  // [kPairStats * n_buckets, P]
  PairStatsCall(int64_t B, int64_t P) : hist_ptrs(ef::kPairStats), hist_buckets(ef::kPairStats), out(ef::kPairStats * B, P) {}
};

// Fills the params of one pair_stats_batch call, checking every argument (the only place they are
// checked), and allocates the outputs. Returned by pointer: p points into the call's own members.
template <typename T>
std::unique_ptr<PairStatsCall<T>> pair_stats_params(const py::array& dots, const Arr<T>& norms,
                                                    const Arr<T>& null_dots, const Arr<double>& resid_norm,
                                                    const IdArr& writers, const IdArr& pairs,
                                                    const Arr<double>& lo, const Arr<double>& inv_width,
                                                    const IdArr& n_bins, const std::vector<py::array>& hists,
                                                    const IdArr& bucket, int64_t n_buckets, int n_threads) {
  constexpr int K = ef::kPairStats;
  const int64_t dots_stride = rows_in_place<T>(dots, "dots", "[T, n_nodes, W]");
  const int64_t T_ = dots.shape(0), Nn = dots.shape(1), W = dots.shape(2);
  const std::string dims = std::to_string(T_) + ", " + std::to_string(Nn);
  if (norms.ndim() != 2 || norms.shape(0) != T_ || norms.shape(1) != Nn)
    fail("norms must have shape [T, n_nodes]=[" + dims + "], got " + shape_of(norms));
  if (resid_norm.ndim() != 1 || resid_norm.shape(0) != T_)
    fail("resid_norm must have shape [T]=[" + std::to_string(T_) + "], got " + shape_of(resid_norm));
  if (writers.ndim() != 1 || writers.shape(0) != W)
    fail("writers must have shape [W]=[" + std::to_string(W) + "], got " + shape_of(writers));
  for (int64_t i = 0; i < W; ++i)
    if (writers.data()[i] < 0 || writers.data()[i] >= Nn)
      fail("writers must be node indices in [0, " + std::to_string(Nn) + "), got " +
           std::to_string(writers.data()[i]) + " at position " + std::to_string(i));
  if (pairs.ndim() != 1) fail("pairs must have shape [P], got " + shape_of(pairs));
  const int64_t P = pairs.shape(0);
  for (int64_t i = 0; i < P; ++i)
    if (pairs.data()[i] < 0 || pairs.data()[i] >= Nn * W)
      fail("pairs must be flat indices node * W + writer in [0, " + std::to_string(Nn * W) + "), got " +
           std::to_string(pairs.data()[i]) + " at position " + std::to_string(i));
  if (null_dots.ndim() != 2 || null_dots.shape(0) != T_ || null_dots.shape(1) != P)
    fail("null_dots must have shape [T, P]=[" + std::to_string(T_) + ", " + std::to_string(P) + "], got " +
         shape_of(null_dots));
  for (const auto* a : {&lo, &inv_width})
    if (a->ndim() != 1 || a->shape(0) != K) fail("lo and inv_width must have shape [" + std::to_string(K) + "]");
  if (n_bins.ndim() != 1 || n_bins.shape(0) != K) fail("n_bins must have shape [" + std::to_string(K) + "]");
  if (static_cast<int64_t>(hists.size()) != K)
    fail("hists must hold " + std::to_string(K) + " arrays, got " + std::to_string(hists.size()));
  if (n_buckets < 1) fail("n_buckets must be >= 1, got " + std::to_string(n_buckets));
  if (bucket.ndim() != 1 || bucket.shape(0) != T_)
    fail("bucket must have shape [T]=[" + std::to_string(T_) + "], got " + shape_of(bucket));
  for (int64_t t = 0; t < T_; ++t)
    if (bucket.data()[t] < 0 || bucket.data()[t] >= n_buckets)
      fail("bucket must lie in [0, " + std::to_string(n_buckets) + "), got " + std::to_string(bucket.data()[t]) +
           " at token " + std::to_string(t));
  auto c = std::make_unique<PairStatsCall<T>>(n_buckets, P);
  for (int k = 0; k < K; ++k) {
    if (n_bins.data()[k] < 1) fail("n_bins must be >= 1");
    if (!std::isfinite(lo.data()[k]) || !std::isfinite(inv_width.data()[k]) || !(inv_width.data()[k] > 0))
      fail("lo must be finite and inv_width finite and > 0");
    c->hist_buckets[k] = check_hist(hists[k], "hists[" + std::to_string(k) + "]", P, n_bins.data()[k], n_buckets);
    c->hist_ptrs[k] = static_cast<int64_t*>(const_cast<py::array&>(hists[k]).mutable_data());
  }
  ef::PairStatsParams<T>& p = c->p;
  p.dots = static_cast<const T*>(dots.data());
  p.dots_stride = dots_stride;
  p.norms = norms.data();
  p.null_dots = null_dots.data();
  p.resid_norm = resid_norm.data();
  p.writers = writers.data();
  p.pairs = pairs.data();
  p.n_tokens = T_;
  p.n_nodes = Nn;
  p.n_writers = W;
  p.n_pairs = P;
  p.bucket = bucket.data();
  p.n_buckets = n_buckets;
  p.hist_buckets = c->hist_buckets.data();
  p.lo = lo.data();
  p.inv_width = inv_width.data();
  p.n_bins = n_bins.data();
  p.hists = c->hist_ptrs.data();
  p.count = c->out.count.mutable_data();
  p.mean = c->out.mean.mutable_data();
  p.m2 = c->out.m2.mutable_data();
  p.n_threads = n_threads;
  return c;
}

template <typename T>
py::tuple run_pair_stats(const py::array& dots, const Arr<T>& norms, const Arr<T>& null_dots,
                         const Arr<double>& resid_norm, const IdArr& writers, const IdArr& pairs,
                         const Arr<double>& lo, const Arr<double>& inv_width, const IdArr& n_bins,
                         const std::vector<py::array>& hists, const IdArr& bucket, int64_t n_buckets,
                         int n_threads) {
  const auto c = pair_stats_params<T>(dots, norms, null_dots, resid_norm, writers, pairs, lo, inv_width,
                                      n_bins, hists, bucket, n_buckets, n_threads);
  {
    py::gil_scoped_release release;
    ef::kernels().scan<T>().pair_stats_batch(c->p);
  }
  return c->out.as_tuple(ef::kPairStats);
}

template <typename T>
void def_pair_stats(py::module_& m, const char* name) {
  m.def(name, &run_pair_stats<T>, py::arg("dots"), py::arg("norms"), py::arg("null_dots"),
        py::arg("resid_norm"), py::arg("writers"), py::arg("pairs"), py::arg("lo"), py::arg("inv_width"),
        py::arg("n_bins"), py::arg("hists"), py::arg("bucket"), py::arg("n_buckets"), py::arg("n_threads") = 0,
        "The scan's per-pair ranking statistics (es, apr, pv, cos, es_null, apr_null, pr_null, pv_null, "
        "cos_null; see erasure_fast/scanning/pair_stats.py) of one batch folded into their histograms: dots "
        "[T, n_nodes, W] (read in place: [n_nodes, W] rows contiguous, any token stride), null_dots [T, P] "
        "(token-major, in the order of pairs), norms [T, n_nodes], resid_norm [T] float64, writers [W] int64 node "
        "indices, pairs [P] int64 flat node * W + writer, lo / inv_width [9] float64, n_bins [9] int64, "
        "hists: 9 int64 arrays [B_k, P, n_bins + 2] (added in place; B_k = n_buckets: each token's row "
        "bucket[t], B_k = 1: every token's row 0), bucket [T] int64 in [0, n_buckets). Returns (count, mean, m2) "
        "[9, n_buckets, P] (a statistic of one bucket in its bucket 0).");
}

// The null dots of the ranked pairs (null_dots.h). Task k: activations x[k] [T, depth_k] (read in place:
// rows contiguous, any token stride), directions dirs[k] [depth_k, n_cols_k] (C-contiguous) and the
// first output column offsets[k]; the tasks' columns must tile [0, n_rows) exactly (every output
// column written once). Returns out [T, n_rows].
template <typename T>
py::array_t<T> run_null_dots(const std::vector<py::array>& x, const std::vector<py::array>& dirs,
                             const IdArr& offsets, int64_t n_rows, int n_threads) {
  const std::string dtype = std::string(py::str(py::dtype::of<T>()));
  const size_t n = x.size();
  if (dirs.size() != n || offsets.ndim() != 1 || static_cast<size_t>(offsets.shape(0)) != n)
    fail("x, dirs and offsets must hold one entry per task, got " + std::to_string(n) + ", " +
         std::to_string(dirs.size()) + " and " + shape_of(offsets));
  if (n_rows < 0) fail("n_rows must be >= 0, got " + std::to_string(n_rows));
  const py::ssize_t item = static_cast<py::ssize_t>(sizeof(T));
  const int64_t T_ = n > 0 ? x[0].ndim() == 2 ? x[0].shape(0) : -1 : 0;
  ef::NullDotsParams<T> p;
  std::vector<const T*> xs(n), ds(n);
  std::vector<int64_t> stride(n), depth(n), cols(n), order(n);
  for (size_t k = 0; k < n; ++k) {
    const std::string at = "[" + std::to_string(k) + "]";
    const py::array& a = x[k];
    const py::array& d = dirs[k];
    if (!a.dtype().equal(py::dtype::of<T>()) || !d.dtype().equal(py::dtype::of<T>()))
      fail("x" + at + " and dirs" + at + " must have dtype " + dtype + ", got " + std::string(py::str(a.dtype())) +
           " and " + std::string(py::str(d.dtype())));
    if (a.ndim() != 2 || a.shape(0) != T_ || a.shape(1) < 1)
      fail("x" + at + " must have shape [T, depth] with T = " + std::to_string(T_) + " (x[0]'s) and depth >= 1, got " +
           shape_of(a));
    if ((a.shape(1) > 1 && a.strides(1) != item) || a.strides(0) < 0 || a.strides(0) % item != 0 ||
        (a.shape(0) > 1 && a.strides(0) < a.shape(1) * item))
      fail("x" + at + " must have contiguous rows (any token stride), got strides " + std::to_string(a.strides(0)) +
           ", " + std::to_string(a.strides(1)));
    if (d.ndim() != 2 || d.shape(0) != a.shape(1) || d.shape(1) < 1 || !(d.flags() & py::array::c_style))
      fail("dirs" + at + " must be C-contiguous with shape [depth, n_cols] = [" + std::to_string(a.shape(1)) +
           ", >= 1], got " + shape_of(d));
    xs[k] = static_cast<const T*>(a.data());
    ds[k] = static_cast<const T*>(d.data());
    stride[k] = a.strides(0) / item;
    depth[k] = a.shape(1);
    cols[k] = d.shape(1);
    order[k] = static_cast<int64_t>(k);
  }
  // the tasks' columns tile [0, n_rows): sorted by offset, each starts where the one before ends
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return offsets.data()[a] < offsets.data()[b]; });
  int64_t next = 0;
  for (int64_t k : order) {
    if (offsets.data()[k] != next)
      fail("the tasks' columns must tile [0, n_rows) exactly: task " + std::to_string(k) + " starts at column " +
           std::to_string(offsets.data()[k]) + ", the columns before it end at " + std::to_string(next));
    next += cols[k];
  }
  if (next != n_rows)
    fail("the tasks' columns must tile [0, n_rows) exactly: they end at column " + std::to_string(next) +
         ", n_rows = " + std::to_string(n_rows));
  py::array_t<T> out({T_, n_rows});
  p.x = xs.data();
  p.x_stride = stride.data();
  p.depth = depth.data();
  p.dirs = ds.data();
  p.n_cols = cols.data();
  p.offset = offsets.data();
  p.n_tasks = static_cast<int>(n);
  p.n_tokens = T_;
  p.n_rows = n_rows;
  p.out = out.mutable_data();
  p.n_threads = n_threads;
  if (n > 0 && T_ > 0) {
    py::gil_scoped_release release;
    ef::kernels().scan<T>().null_dots(p);
  }
  return out;
}

template <typename T>
void def_null_dots(py::module_& m, const char* name) {
  m.def(name, &run_null_dots<T>, py::arg("x"), py::arg("dirs"), py::arg("offsets"), py::arg("n_rows"),
        py::arg("n_threads") = 0,
        "The null dots of a scan's ranked pairs (see erasure_fast/scanning/pair_stats.py, null_dots): for "
        "every task k, out[t, offsets[k] + c] = sum_i x[k][t, i] dirs[k][i, c], x[k] [T, depth_k] (read in "
        "place: rows contiguous, any token stride), dirs[k] [depth_k, n_cols_k] C-contiguous; the tasks' "
        "columns must tile [0, n_rows) exactly. Returns out [T, n_rows].");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "erasure_fast C++/OpenMP CPU kernel (see erasure_fast/contract.py for the contract)";
  py::register_exception<NonFiniteInput>(m, "NonFiniteInput", PyExc_ValueError);
  py::register_exception<NonFiniteOutput>(m, "NonFiniteOutput", PyExc_ValueError);
  def_entry<ef::Native<float>>(m, "fused_attribution_f32", "float32");
  def_entry<ef::Native<double>>(m, "fused_attribution_f64", "float64");
  def_entry<ef::Bf16>(m, "fused_attribution_bf16", "bfloat16");
  def_entry<ef::F16>(m, "fused_attribution_f16", "float16");
  def_dla<ef::Native<float>>(m, "f32", "float32");
  def_dla<ef::Native<double>>(m, "f64", "float64");
  def_dla<ef::Bf16>(m, "bf16", "bfloat16");
  def_dla<ef::F16>(m, "f16", "float16");
  def_series_stats<float>(m, "series_stats_batch_f32");
  def_series_stats<double>(m, "series_stats_batch_f64");
  def_ratio_stats<float>(m, "ratio_stats_batch_f32");
  def_ratio_stats<double>(m, "ratio_stats_batch_f64");
  def_pair_stats<float>(m, "pair_stats_batch_f32");
  def_pair_stats<double>(m, "pair_stats_batch_f64");
  def_null_dots<float>(m, "null_dots_f32");
  def_null_dots<double>(m, "null_dots_f64");
  m.def("dla_prefer_table", &ef::prefer_table, py::arg("n_unique"), py::arg("n_valid_tokens"),
        py::arg("d_model"), "The auto rule of dla_gathered_*: True = gather from the table.");
  m.def("select_cpu_path", [](const std::string& name) { return std::string(ef::path_name(ef::select_path(name))); },
        py::arg("name"),
        "Selects the kernel path of later calls: 'auto' (the fastest this CPU runs) or a path name "
        "(cpu_paths()). Raises ValueError for an unknown name, a path not compiled in, or one this CPU "
        "cannot run. Returns the selected path's name.");
  m.def("cpu_paths", []() {
    py::dict d;
    for (int i = 0; i < ef::kNumPaths; ++i) {
      const auto p = static_cast<ef::CpuPath>(i);
      const bool compiled = ef::path_compiled(p);
      py::dict e;
      e["compiled"] = compiled;
      e["missing"] = ef::missing_features(p);
      e["runs_here"] = compiled && ef::cpu_runs(p);
      e["simd"] = compiled ? py::object(py::str(ef::path_simd(p))) : py::object(py::none());
      d[ef::path_name(p)] = e;
    }
    return d;
  }, "Every kernel path: {name: {compiled, runs_here, missing (features this CPU / OS lacks), simd}}, "
     "from the most portable to the fastest.");
  m.def("scratch_info", []() {
    py::dict d;
    const size_t from = ef::scratch_min_bytes();
    d["min_bytes"] = from ? py::object(py::int_(from)) : py::object(py::none());
    d["keep_bytes"] = ef::scratch_keep_bytes();
    d["kept_bytes"] = ef::scratch_kept_bytes();
    d["kept_blocks"] = ef::scratch_kept_blocks();
    return d;
  }, "The pool of large scratch buffers kept between calls: {min_bytes (scratch from this size comes from "
     "the pool; None: never), keep_bytes (the most it keeps), kept_bytes, kept_blocks (now)}.");
  m.def("release_scratch", []() { ef::scratch_trim(); },
        "Releases every scratch buffer the pool keeps to the system (later calls map new ones).");
  m.def("_fill_kept_scratch", [](int byte) {
    if (byte < 0 || byte > 255) throw py::value_error("byte must be in [0, 255]");
    ef::scratch_fill_kept(static_cast<unsigned char>(byte));
  }, py::arg("byte"), "Tests: overwrites every kept scratch buffer with `byte`.");
  m.def("build_info", []() {
    py::dict d;
#if defined(_OPENMP) && EF_OPENMP_LINKED
    d["openmp"] = true;
    d["max_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["max_threads"] = 1;
#endif
    d["cpu_arch"] = std::string(EF_CPU_ARCH_NAME);
    const ef::CpuPath p = ef::selected_path();
    const ef::Kernels& k = ef::kernels();
    d["cpu_path"] = std::string(ef::path_name(p));
    d["best_cpu_path"] = std::string(ef::path_name(ef::best_path()));
    d["cpu_paths"] = ef::compiled_names();
    d["simd"] = std::string(ef::path_simd(p));
    d["tile_tokens"] = k.tile_tokens;
    d["chunk_cols"] = k.chunk_cols;
    const size_t mapped = ef::mapped_output_bytes();
    d["mapped_output_bytes"] = mapped ? py::object(py::int_(mapped)) : py::object(py::none());
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
    d["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
    d["compiler"] = std::string("unknown");
#endif
    return d;
  }, "Build facts and the selected kernel path: {openmp, max_threads, cpu_arch (build option), cpu_path "
     "(selected), best_cpu_path, cpu_paths (compiled), simd, tile_tokens, chunk_cols, compiler}.");
}
