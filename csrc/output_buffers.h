// Output arrays in the pool's mappings (scratch_pool.h), their pages mapped before a kernel writes them.
//
// A large output (K1's dots: 36 MiB for 8,192 GELU-4L tokens) used to be fresh memory on every call:
// the allocator mapped it anew and each 4 KiB page faulted on its first write, inside the kernel,
// where the two threads' faults contended with each other and with the arithmetic. A large output is
// now a block of the scratch pool: a kept block, whose pages are mapped already (the array gives it
// back to the pool when it goes), or a new mapping with huge pages (mapped_memory.h), whose pages
// each thread maps for its share in one madvise(MADV_POPULATE_WRITE) before the kernel runs. Small
// outputs come from the allocator as before.
// Compiled for the baseline ISA (no kernel code here).
#pragma once

#include <pybind11/numpy.h>

#include <vector>

namespace ef {

// A C-contiguous array of `shape` (contents unspecified). Arrays of at least mapped_output_bytes() are
// pool blocks whose pages are mapped before returning (by `n_threads` threads, <= 0: the OpenMP
// default, where the block is new), given back to the pool with the array; smaller ones are plain
// numpy allocations.
template <typename T>
pybind11::array_t<T> mapped_output(const std::vector<pybind11::ssize_t>& shape, int n_threads);

// The size from which outputs come from the pool: scratch_min_bytes() (0: never, in builds with
// AddressSanitizer, which checks accesses to heap blocks but not to raw mappings, and where there is
// no mmap).
size_t mapped_output_bytes();

}  // namespace ef
