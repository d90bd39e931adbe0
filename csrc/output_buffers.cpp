#include "output_buffers.h"

#if defined(__unix__) || defined(__APPLE__)
#define EF_MAPPED_OUTPUTS 1
#include <sys/mman.h>
#else
#define EF_MAPPED_OUTPUTS 0  // no mmap / madvise: plain allocations
#endif

#include <algorithm>
#include <memory>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace py = pybind11;

namespace ef {
namespace {

#if EF_MAPPED_OUTPUTS
constexpr size_t kPage = 4096;

struct Mapping {  // what the array's owner releases
  void* p;
  size_t bytes;
};

// Maps [p, p + bytes) writable where the kernel has MADV_POPULATE_WRITE (Linux 5.14). Where it has
// not, or memory is short, the pages stay as they are and fault on first write, as any fresh allocation.
void populate(char* p, size_t bytes) {
  if (bytes) (void)madvise(p, bytes, MADV_POPULATE_WRITE);
}
#endif

}  // namespace

size_t mapped_output_bytes() {
#if defined(__SANITIZE_ADDRESS__) || !EF_MAPPED_OUTPUTS
  return 0;
#else
  return size_t(4) << 20;
#endif
}

template <typename T>
py::array_t<T> mapped_output(const std::vector<py::ssize_t>& shape, int n_threads) {
  size_t n = 1;
  for (py::ssize_t s : shape) n *= static_cast<size_t>(s);
  const size_t bytes = n * sizeof(T);
  const size_t from = mapped_output_bytes();
  if (from == 0 || bytes < from) return py::array_t<T>(shape);
#if EF_MAPPED_OUTPUTS
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) throw std::bad_alloc();
  char* base = static_cast<char*>(mem);
  {
    py::gil_scoped_release release;
    const size_t pages = (bytes + kPage - 1) / kPage;
#ifdef _OPENMP
    const int nt = n_threads > 0 ? n_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
    {
      const size_t k = static_cast<size_t>(omp_get_num_threads()), i = static_cast<size_t>(omp_get_thread_num());
      const size_t first = pages * i / k, last = pages * (i + 1) / k;
      if (last > first) populate(base + first * kPage, std::min(bytes, last * kPage) - first * kPage);
    }
#else
    (void)n_threads;
    populate(base, bytes);
#endif
  }
  py::capsule owner;
  try {
    auto m = std::make_unique<Mapping>(Mapping{mem, bytes});
    owner = py::capsule(m.get(), [](void* q) {
      std::unique_ptr<Mapping> mp(static_cast<Mapping*>(q));
      munmap(mp->p, mp->bytes);
    });
    m.release();  // the capsule owns it now
  } catch (...) {
    munmap(mem, bytes);
    throw;
  }
  return py::array_t<T>(shape, static_cast<T*>(mem), owner);
#else
  (void)n_threads;
  return py::array_t<T>(shape);  // (not reached: mapped_output_bytes() is 0 without mmap)
#endif
}

template py::array_t<float> mapped_output<float>(const std::vector<py::ssize_t>&, int);
template py::array_t<double> mapped_output<double>(const std::vector<py::ssize_t>&, int);

}  // namespace ef
