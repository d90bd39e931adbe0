#include "scratch_pool.h"

#include <cstring>
#include <deque>
#include <mutex>
#include <new>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "mapped_memory.h"

namespace ef {
namespace {

constexpr size_t kMinBytes = size_t(256) << 10;
constexpr size_t kKeepBytes = size_t(128) << 20;

struct Pool {
  std::mutex m;
  std::deque<ScratchBlock> kept;  // oldest first
  size_t kept_bytes = 0;
};

Pool* make_pool();

Pool& pool() {
  static Pool* p = make_pool();  // never destroyed: blocks may be released during interpreter shutdown
  return *p;
}

#if defined(__unix__) || defined(__APPLE__)
// A child forked while another thread of the parent held the lock would wait on it forever: the
// child starts with a new lock (its kept blocks are its own copies, as all its memory).
void reset_lock_in_child() { new (&pool().m) std::mutex(); }
#endif

Pool* make_pool() {
#if defined(__unix__) || defined(__APPLE__)
  pthread_atfork(nullptr, nullptr, &reset_lock_in_child);
#endif
  return new Pool;
}

}  // namespace

size_t scratch_min_bytes() { return maps_memory() ? kMinBytes : 0; }

size_t scratch_keep_bytes() { return maps_memory() ? kKeepBytes : 0; }

ScratchBlock scratch_acquire(size_t bytes) {
  ScratchBlock b;
  if (bytes == 0) return b;
  const size_t from = scratch_min_bytes();
  if (from == 0 || bytes < from) {
    b.p = ::operator new[](bytes, std::align_val_t(64));
    b.bytes = bytes;
    return b;
  }
  const size_t want = mapping_size(bytes);
  {
    // the smallest kept block that holds `want`, unless it is more than twice as large
    Pool& pl = pool();
    std::lock_guard<std::mutex> lock(pl.m);
    auto best = pl.kept.end();
    for (auto it = pl.kept.begin(); it != pl.kept.end(); ++it)
      if (it->bytes >= want && it->bytes <= 2 * want && (best == pl.kept.end() || it->bytes < best->bytes)) best = it;
    if (best != pl.kept.end()) {
      b = *best;
      b.fresh = false;
      pl.kept_bytes -= b.bytes;
      pl.kept.erase(best);
      return b;
    }
  }
  b.p = map_memory(want);
  b.bytes = want;
  b.mapped = true;
  b.fresh = true;
  return b;
}

void scratch_release(const ScratchBlock& b) noexcept {
  if (!b.p) return;
  if (!b.mapped) {
    ::operator delete[](b.p, std::align_val_t(64));
    return;
  }
  if (b.bytes > kKeepBytes) {
    unmap_memory(b.p, b.bytes);
    return;
  }
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.m);
  while (pl.kept_bytes + b.bytes > kKeepBytes) {
    const ScratchBlock old = pl.kept.front();
    pl.kept.pop_front();
    pl.kept_bytes -= old.bytes;
    unmap_memory(old.p, old.bytes);
  }
  try {
    pl.kept.push_back(b);
    pl.kept_bytes += b.bytes;
  } catch (...) {  // no memory to keep it: release it
    unmap_memory(b.p, b.bytes);
  }
}

size_t scratch_kept_bytes() {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.m);
  return pl.kept_bytes;
}

size_t scratch_kept_blocks() {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.m);
  return pl.kept.size();
}

void scratch_trim() noexcept {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.m);
  for (const auto& d : pl.kept) unmap_memory(d.p, d.bytes);
  pl.kept.clear();
  pl.kept_bytes = 0;
}

void scratch_fill_kept(unsigned char byte) {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.m);
  for (const auto& b : pl.kept) std::memset(b.p, byte, b.bytes);
}

}  // namespace ef
