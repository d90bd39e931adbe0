// Output arrays whose pages are mapped before a kernel writes them.
//
// A large output (K1's dots: 36 MiB for 8,192 GELU-4L tokens) is fresh memory on every call: the
// allocator maps it anew and each 4 KiB page faults on its first write, inside the kernel, where
// the two threads' faults contend with each other and with the arithmetic. Mapping the pages up front
// in one madvise(MADV_POPULATE_WRITE) per thread costs a fraction of that (the kernel still zeroes
// them: fresh memory is never handed over unzeroed). Small outputs come from the allocator as before.
// Compiled for the baseline ISA (no kernel code here).
#pragma once

#include <pybind11/numpy.h>

#include <vector>

namespace ef {

// A C-contiguous array of `shape` (contents unspecified). Arrays of at least mapped_output_bytes() are
// anonymous mappings whose pages `n_threads` threads (<= 0: the OpenMP default) map before returning,
// released with the array; smaller ones are plain numpy allocations.
template <typename T>
pybind11::array_t<T> mapped_output(const std::vector<pybind11::ssize_t>& shape, int n_threads);

// The size from which outputs are mapped up front (0: never, in builds with AddressSanitizer, which
// checks accesses to heap blocks but not to raw mappings, and where there is no mmap).
size_t mapped_output_bytes();

}  // namespace ef
