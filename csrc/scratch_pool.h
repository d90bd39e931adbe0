// The kernels' large scratch buffers, kept between calls.
//
// K2n's head-space directions alone are 10.6 MiB for 1,300 GELU-4L targets. From the allocator,
// such a buffer is memory the system took back after other work (a forward pass's freed activations,
// malloc_trim): every 4 KiB page faulted again on its first write, ~1.4 us each on a Xeon (KVM) here,
// ~4,800 faults and 7 ms of a 20 ms fp32 K2n call. Buffers of at least scratch_min_bytes() are
// mappings with huge pages (mapped_memory.h) instead, and a released one is kept for the next call,
// up to scratch_keep_bytes() in all (the oldest go first). A kept buffer holds whatever its last user
// left, as any allocation does: no kernel reads scratch it has not written (tests/test_cpu_paths.py
// overwrites the kept buffers between two calls and compares them bitwise).
// Compiled for the baseline ISA (no kernel code here); thread-safe.
#pragma once

#include <cstddef>

namespace ef {

struct ScratchBlock {
  void* p = nullptr;
  size_t bytes = 0;     // what the block holds (at least what was asked for)
  bool mapped = false;  // a mapping of the pool's (else an aligned heap block)
  bool fresh = false;   // a new mapping (zero-filled, its pages not yet faulted in), not a kept one
};

// A 64-byte aligned block of at least `bytes` (0: none); throws std::bad_alloc.
ScratchBlock scratch_acquire(size_t bytes);

// Gives `b` back: kept for a later scratch_acquire, or released to the system.
void scratch_release(const ScratchBlock& b) noexcept;

// The size from which scratch comes from the pool (0: never, where maps_memory() is false).
size_t scratch_min_bytes();

// The most the pool keeps between calls.
size_t scratch_keep_bytes();

// What the pool keeps now: bytes and blocks.
size_t scratch_kept_bytes();
size_t scratch_kept_blocks();

// Releases every kept block to the system.
void scratch_trim() noexcept;

// Overwrites every kept block with `byte` (tests: kernels must not depend on what scratch holds).
void scratch_fill_kept(unsigned char byte);

}  // namespace ef
