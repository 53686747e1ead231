// Bin planning for sequence packing: plain C++, no torch, so it compiles in a second and can be
// reused by a data loader without the extension's torch dependency.
#pragma once

#include <cstdint>
#include <vector>

namespace tec_fast {

// Best-fit-decreasing: sequences sorted by length (longest first, ties by id), each placed into
// the open bin with the least room that still fits it (ties: the oldest bin), else a new bin.
// O(n log n). Every id appears exactly once; no bin holds more than `capacity` tokens.
// Throws std::invalid_argument (Python: ValueError) naming the first bad length or capacity.
std::vector<std::vector<int64_t>> plan_bins(const int64_t* lengths, int64_t n, int64_t capacity);

}  // namespace tec_fast
