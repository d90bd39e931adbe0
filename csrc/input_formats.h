// Input formats of the CPU kernels: how a kernel reads its floating inputs.
//
// A kernel reads every floating input through `In::load`, converting on load to the accumulation
// type `In::acc` (float for fp32 / bf16 / fp16 inputs, double for fp64), so half-precision inputs are
// never copied to a float array first. Every bf16 / fp16 value is exactly a float value. bf16 and
// fp16 arrays arrive as their raw uint16 bits (numpy has no bfloat16).
#pragma once

#include <cstdint>
#include <cstring>

namespace ef {

template <typename T>
struct Native {
  using storage = T;
  using acc = T;
  static inline T load(T x) { return x; }
};

struct Bf16 {
  using storage = uint16_t;
  using acc = float;
  static inline float load(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};

struct F16 {
  using storage = uint16_t;
  using acc = float;
  static inline float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
      bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN (payload kept)
    } else if (exp != 0) {
      bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
    } else if (mant == 0) {
      bits = sign;  // +-0
    } else {  // subnormal: mant * 2^-24, exact in float
      const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
      return sign ? -f : f;
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};

// A stored value is NaN or infinite exactly when every bit of its exponent is set: the raw bits
// (`type`) and that mask, for the kernels' finiteness check of the activations they read.
template <typename In>
struct ExponentBits;
template <>
struct ExponentBits<Native<float>> {
  using type = uint32_t;
  static constexpr type mask = 0x7f800000u;
};
template <>
struct ExponentBits<Native<double>> {
  using type = uint64_t;
  static constexpr type mask = 0x7ff0000000000000ull;
};
template <>
struct ExponentBits<Bf16> {
  using type = uint16_t;
  static constexpr type mask = 0x7f80u;
};
template <>
struct ExponentBits<F16> {
  using type = uint16_t;
  static constexpr type mask = 0x7c00u;
};

// What a kernel asked to check its activations reports (FusedParams / DlaParams::nonfinite).
enum NonfiniteInput : unsigned {
  kNonfiniteZ = 1u,           // z holds a NaN or an infinity
  kNonfiniteExtra = 2u,       // extra_nodes does
  kNonfiniteW_O = 4u,         // W_O does (weight_checks.h)
  kNonfiniteDirections = 8u,  // a row of directions the call reads does (weight_checks.h)
};

// What a kernel asked to check its outputs reports (FusedParams / DlaParams::out_nonfinite): an output
// with a NaN or an infinity where finite inputs define it (every value but the DLA of a token
// without a target, which is NaN by the contract).
enum NonfiniteOutput : unsigned {
  kNonfiniteDla = 1u,
  kNonfiniteDots = 2u,
  kNonfiniteNorms = 4u,
};

}  // namespace ef
