#include "mapped_memory.h"

#if (defined(__unix__) || defined(__APPLE__)) && !defined(__SANITIZE_ADDRESS__)
#define EF_MAPS_MEMORY 1
#include <sys/mman.h>
#else
#define EF_MAPS_MEMORY 0
#endif

#include <cstdint>
#include <new>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace ef {

bool maps_memory() { return EF_MAPS_MEMORY != 0; }

size_t mapping_size(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

#if EF_MAPS_MEMORY
void* map_memory(size_t bytes) {
  const size_t size = mapping_size(bytes);
  // one huge page more than asked, then the unaligned head and the tail given back
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  char* base = static_cast<char*>(raw);
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1));
  if (p > base) munmap(base, static_cast<size_t>(p - base));
  const size_t tail = static_cast<size_t>(base + size + kHugePage - (p + size));
  if (tail) munmap(p + size, tail);
#ifdef MADV_HUGEPAGE
  (void)madvise(p, size, MADV_HUGEPAGE);  // advice only: refused where huge pages are off
#endif
  return p;
}

void unmap_memory(void* p, size_t bytes) noexcept {
  if (p) munmap(p, mapping_size(bytes));
}

void populate_memory(void* p, size_t bytes) noexcept {
  if (p && bytes) (void)madvise(p, bytes, MADV_POPULATE_WRITE);
}
#else
void* map_memory(size_t) { throw std::bad_alloc(); }
void unmap_memory(void*, size_t) noexcept {}
void populate_memory(void*, size_t) noexcept {}
#endif

}  // namespace ef
