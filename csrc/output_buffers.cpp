#include "output_buffers.h"

#include <algorithm>
#include <memory>
#include <new>

#include "mapped_memory.h"
#include "scratch_pool.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace ef {

size_t mapped_output_bytes() { return scratch_min_bytes(); }

template <typename T>
py::array_t<T> mapped_output(const std::vector<py::ssize_t>& shape, int n_threads) {
  size_t n = 1;
  for (py::ssize_t s : shape) n *= static_cast<size_t>(s);
  const size_t bytes = n * sizeof(T);
  const size_t from = mapped_output_bytes();
  if (from == 0 || bytes < from) return py::array_t<T>(shape);
  const ScratchBlock b = scratch_acquire(bytes);
  if (b.fresh) {
    py::gil_scoped_release release;
    char* base = static_cast<char*>(b.p);
    // whole huge pages per thread, so that no two threads fault the same one
    const size_t pages = b.bytes / kHugePage;
#ifdef _OPENMP
    const int nt = n_threads > 0 ? n_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
    {
      const size_t k = static_cast<size_t>(omp_get_num_threads()), i = static_cast<size_t>(omp_get_thread_num());
      const size_t first = pages * i / k * kHugePage, last = std::min(bytes, pages * (i + 1) / k * kHugePage);
      if (last > first) populate_memory(base + first, last - first);
    }
#else
    (void)n_threads;
    (void)pages;
    populate_memory(base, bytes);
#endif
  }
  py::capsule owner;
  try {
    auto m = std::make_unique<ScratchBlock>(b);
    owner = py::capsule(m.get(), [](void* q) {
      std::unique_ptr<ScratchBlock> mb(static_cast<ScratchBlock*>(q));
      scratch_release(*mb);
    });
    m.release();  // the capsule owns it now
  } catch (...) {
    scratch_release(b);
    throw;
  }
  return py::array_t<T>(shape, static_cast<T*>(b.p), owner);
}

template py::array_t<float> mapped_output<float>(const std::vector<py::ssize_t>&, int);
template py::array_t<double> mapped_output<double>(const std::vector<py::ssize_t>&, int);

}  // namespace ef
