#include "plan_bins.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

namespace tec_fast {

std::vector<std::vector<int64_t>> plan_bins(const int64_t* lengths, int64_t n, int64_t capacity) {
  if (capacity <= 0) {
    throw std::invalid_argument("plan_bins: capacity must be a positive integer, got " +
                                std::to_string(capacity));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 0) {
      throw std::invalid_argument("plan_bins: lengths[" + std::to_string(i) + "] = " +
                                  std::to_string(lengths[i]) + " is negative");
    }
    if (lengths[i] > capacity) {
      throw std::invalid_argument("plan_bins: lengths[" + std::to_string(i) + "] = " +
                                  std::to_string(lengths[i]) + " exceeds capacity " +
                                  std::to_string(capacity));
    }
  }

  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [lengths](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

  std::vector<std::vector<int64_t>> bins;
  // (room left, bin id): lower_bound({len, -1}) is the tightest bin that fits, oldest first.
  // Full bins stay in the set so zero-length sequences join them instead of opening a new bin.
  std::set<std::pair<int64_t, int64_t>> room;
  for (int64_t id : order) {
    const int64_t len = lengths[id];
    auto it = room.lower_bound({len, -1});
    int64_t bin;
    int64_t left;
    if (it == room.end()) {
      bin = static_cast<int64_t>(bins.size());
      bins.emplace_back();
      left = capacity - len;
      room.emplace_hint(room.end(), left, bin);
    } else {
      bin = it->second;
      left = it->first - len;
      if (left != it->first) {
        auto hint = room.erase(it);
        room.emplace_hint(hint, left, bin);
      }
    }
    bins[bin].push_back(id);
  }
  return bins;
}

}  // namespace tec_fast
