// Size products of user-given dimensions, checked before they are used to allocate or index:
// (B, L) from a caller can multiply past int64 and wrap into a small, wrong buffer.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace tec_fast {

inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &out), op, ": ", what, " = ", a, " * ", b,
                    " overflows int64");
  return out;
}

}  // namespace tec_fast
