// Anonymous mappings for the extension's large buffers (outputs, kept scratch).
//
// A mapping is 2 MiB aligned and asks for transparent huge pages (MADV_HUGEPAGE), so that where the
// system offers them, its first writes fault once per 2 MiB instead of once per 4 KiB page: 10.6 MiB
// of fresh memory took 3.2 ms to fault in as 4 KiB pages and 0.6 ms as huge pages on a Xeon (KVM)
// here. Where the system has none, or refuses them, the mapping works as any other.
// Compiled for the baseline ISA (no kernel code here).
#pragma once

#include <cstddef>

namespace ef {

constexpr size_t kHugePage = size_t(2) << 20;

// Whether this build maps its large buffers (false in builds with AddressSanitizer, which checks
// accesses to heap blocks but not to raw mappings, and where there is no mmap).
bool maps_memory();

// `bytes` rounded up to whole huge pages.
size_t mapping_size(size_t bytes);

// A fresh zero-filled mapping of mapping_size(bytes) bytes, 2 MiB aligned; throws std::bad_alloc.
// Only where maps_memory().
void* map_memory(size_t bytes);

// Releases what map_memory(bytes) returned.
void unmap_memory(void* p, size_t bytes) noexcept;

// Maps the pages of [p, p + bytes) writable up front (MADV_POPULATE_WRITE, Linux 5.14); where the
// system cannot, they fault on first write as any fresh memory.
void populate_memory(void* p, size_t bytes) noexcept;

}  // namespace ef
