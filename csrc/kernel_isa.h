// The namespace of the kernel code being compiled: ef::<path> (see cpu_features.h for the paths).
//
// CMake compiles every kernel source once per path, with -DEF_ISA=<path> and that path's
// instruction-set flags, into one module. Everything a kernel source defines lives in ef::EF_ISA,
// so each path's kernels and helpers are distinct symbols and the dispatcher (dispatch.h) picks
// one path's at run time. Code outside the kernel sources (bindings, dispatch, cpu_features) is
// compiled for the baseline and sees EF_ISA = portable.
#pragma once

#ifndef EF_ISA
#define EF_ISA portable
#endif
