// CPU kernels of tec_fast.packing, registered under the CPU dispatch key of the `tec_fast::`
// operators that tec_fast/packing/library.py defines (schemas, fake and autograd formulas live there, so
// the pure-torch fallback and these kernels share one definition). Also the pybind11 module
// `tec_fast._C` with plan_bins and the build facts that packing.extension_status() reports.
// Only the ATen/pybind11 headers it needs: torch/extension.h would double the compile time.
//
// Every op here moves whole rows of C elements, so copies are memcpy's of row_bytes and need no
// dtype dispatch; only the fill gradient (a reduction) does arithmetic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "checked_math.h"
#include "plan_bins.h"

namespace tec_fast {
namespace {

using at::Tensor;

// About 64 KiB of copying per parallel chunk: below that, waking a second thread costs more
// than it saves.
int64_t grain_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_bytes));
}

void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ",
                    t.device());
}

void check_index_tensor(const Tensor& index, const char* op, const char* name) {
  check_cpu(index, op, name);
  TORCH_CHECK_VALUE(index.dim() == 1 && index.scalar_type() == at::kLong, op, ": ", name,
                    " must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ",
                    index.sizes());
}

void check_rows_tensor(const Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [rows, C], got shape ",
                    t.sizes());
}

// dst[t] = src[index[t]] for rows of row_bytes bytes; indices already checked.
void copy_rows(const char* src, const int64_t* index, int64_t T, int64_t row_bytes, char* dst) {
  if (row_bytes == 0) return;
  at::parallel_for(0, T, grain_rows(row_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::memcpy(dst + t * row_bytes, src + index[t] * row_bytes, row_bytes);
    }
  });
}

// Checks every index lies in [0, n) and names the first that does not.
void check_bounds(const int64_t* index, int64_t T, int64_t n, const char* op, const char* name) {
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(index[t] >= 0 && index[t] < n, op, ": ", name, "[", t, "] = ", index[t],
                      " is outside [0, ", n, ")");
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pack_cpu(const Tensor& x, const Tensor& keep) {
  check_cpu(x, "pack", "x");
  check_cpu(keep, "pack", "keep");
  TORCH_CHECK_VALUE(x.dim() == 3, "pack: x must be [B, L, C], got shape ", x.sizes());
  TORCH_CHECK_VALUE(keep.scalar_type() == at::kBool && keep.dim() == 2 &&
                        keep.size(0) == x.size(0) && keep.size(1) == x.size(1),
                    "pack: keep must be a bool [B, L] mask matching x ", x.sizes(), ", got ",
                    keep.scalar_type(), " of shape ", keep.sizes());
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const Tensor xc = x.contiguous();
  const Tensor kc = keep.contiguous();
  const bool* k = kc.data_ptr<bool>();

  std::vector<int64_t> counts(B);
  at::parallel_for(0, B, grain_rows(L), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* row = k + b * L;
      int64_t n = 0;
      for (int64_t j = 0; j < L; ++j) n += row[j];
      counts[b] = n;
    }
  });

  Tensor cu_seqlens = at::empty({B + 1}, kc.options().dtype(at::kInt));  // [B+1]
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int64_t T = 0, max_len = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    T += counts[b];
    max_len = std::max(max_len, counts[b]);
    TORCH_CHECK_VALUE(T <= std::numeric_limits<int32_t>::max(), "pack: ", T,
                      " kept tokens overflow the int32 cu_seqlens");
    cu[b + 1] = static_cast<int32_t>(T);
  }

  Tensor index = at::empty({T}, kc.options().dtype(at::kLong));  // [T]
  int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, B, grain_rows(L), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* row = k + b * L;
      int64_t t = cu[b];
      for (int64_t j = 0; j < L; ++j) {
        if (row[j]) idx[t++] = b * L + j;
      }
    }
  });

  Tensor packed = at::empty({T, C}, xc.options());  // [T, C]
  const int64_t row_bytes = C * static_cast<int64_t>(xc.element_size());
  copy_rows(static_cast<const char*>(xc.const_data_ptr()), idx, T, row_bytes,
            static_cast<char*>(packed.data_ptr()));
  return {packed, cu_seqlens, index, at::scalar_tensor(max_len, at::kLong)};
}

Tensor unpack_cpu(const Tensor& packed, const Tensor& index, const Tensor& fill, int64_t B,
                  int64_t L) {
  check_rows_tensor(packed, "unpack", "packed");
  check_index_tensor(index, "unpack", "index");
  check_cpu(fill, "unpack", "fill");
  const int64_t T = packed.size(0), C = packed.size(1);
  TORCH_CHECK_VALUE(index.size(0) == T, "unpack: index must have T = ", T,
                    " entries (one per packed row), got ", index.size(0));
  TORCH_CHECK_VALUE(fill.dim() == 1 && fill.size(0) == C && fill.scalar_type() == packed.scalar_type(),
                    "unpack: fill must be [C = ", C, "] of dtype ", packed.scalar_type(), ", got ",
                    fill.scalar_type(), " of shape ", fill.sizes());
  TORCH_CHECK_VALUE(B >= 0 && L >= 0, "unpack: (B, L) must be non-negative, got (", B, ", ", L, ")");
  const int64_t N = tec_fast::checked_mul(B, L, "unpack", "B * L");
  tec_fast::checked_mul(N, C, "unpack", "B * L * C");
  const Tensor pc = packed.contiguous();
  const Tensor ic = index.contiguous();
  const Tensor fc = fill.contiguous();
  const int64_t* idx = ic.const_data_ptr<int64_t>();

  // inverse map: inv[b*L+j] = packed row that lands there, or -1 (fill)
  std::vector<int64_t> inv(N, -1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t i = idx[t];
    TORCH_CHECK_VALUE(i >= 0 && i < N, "unpack: index[", t, "] = ", i, " is outside [0, ", N,
                      ") = [0, B*L) for (B, L) = (", B, ", ", L, ")");
    TORCH_CHECK_VALUE(inv[i] < 0, "unpack: index holds position ", i, " twice (index[", inv[i],
                      "] and index[", t, "])");
    inv[i] = t;
  }

  Tensor out = at::empty({B, L, C}, pc.options());  // [B, L, C]
  const int64_t row_bytes = C * static_cast<int64_t>(pc.element_size());
  if (row_bytes == 0) return out;
  const char* src = static_cast<const char*>(pc.const_data_ptr());
  const char* f = static_cast<const char*>(fc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, N, grain_rows(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(dst + r * row_bytes, inv[r] >= 0 ? src + inv[r] * row_bytes : f, row_bytes);
    }
  });
  return out;
}

Tensor gather_rows_cpu(const Tensor& src, const Tensor& index) {
  check_rows_tensor(src, "gather_rows", "src");
  check_index_tensor(index, "gather_rows", "index");
  const Tensor sc = src.contiguous();
  const Tensor ic = index.contiguous();
  const int64_t T = ic.size(0);
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  check_bounds(idx, T, sc.size(0), "gather_rows", "index");
  Tensor out = at::empty({T, sc.size(1)}, sc.options());  // [T, C]
  copy_rows(static_cast<const char*>(sc.const_data_ptr()), idx, T,
            sc.size(1) * static_cast<int64_t>(sc.element_size()), static_cast<char*>(out.data_ptr()));
  return out;
}

// out[c] = sum of grad[r, c] over rows r that index does not name (the gradient of `fill`).
Tensor unkept_row_sum_cpu(const Tensor& grad, const Tensor& index) {
  check_rows_tensor(grad, "unkept_row_sum", "grad");
  check_index_tensor(index, "unkept_row_sum", "index");
  TORCH_CHECK_VALUE(at::isFloatingType(grad.scalar_type()),
                    "unkept_row_sum: grad must be floating point, got ", grad.scalar_type());
  const Tensor gc = grad.contiguous();
  const Tensor ic = index.contiguous();
  const int64_t N = gc.size(0), C = gc.size(1), T = ic.size(0);
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  check_bounds(idx, T, N, "unkept_row_sum", "index");
  std::vector<uint8_t> kept(N, 0);
  for (int64_t t = 0; t < T; ++t) kept[idx[t]] = 1;

  Tensor out = at::empty({C}, gc.options());  // [C]
  constexpr int64_t kCols = 64;  // one cache-friendly column strip per task
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "unkept_row_sum", [&] {
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (C + kCols - 1) / kCols, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t c0 = s * kCols, c1 = std::min(C, c0 + kCols);
        double acc[kCols] = {0.0};  // double: exact enough for any row count we will see
        for (int64_t r = 0; r < N; ++r) {
          if (kept[r]) continue;
          const scalar_t* row = g + r * C;
          for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(row[c]);
        }
        for (int64_t c = c0; c < c1; ++c) o[c] = static_cast<scalar_t>(acc[c - c0]);
      }
    });
  });
  return out;
}

// (row, col) of each packed token in its image's patch grid: j = index % seq_len, w = grid_w of
// image index / seq_len (or grid_w[0] for all images when grid_w has one entry).
Tensor position_ids_cpu(const Tensor& index, int64_t seq_len, const Tensor& grid_w) {
  check_index_tensor(index, "position_ids", "index");
  check_index_tensor(grid_w, "position_ids", "grid_w");
  TORCH_CHECK_VALUE(seq_len > 0, "position_ids: seq_len must be positive, got ", seq_len);
  const int64_t G = grid_w.size(0);
  TORCH_CHECK_VALUE(G >= 1, "position_ids: grid_w must hold at least one width");
  const Tensor ic = index.contiguous();
  const Tensor wc = grid_w.contiguous();
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const int64_t* w = wc.const_data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK_VALUE(w[g] > 0, "position_ids: grid_w[", g, "] = ", w[g], " must be positive");
  }
  const int64_t T = ic.size(0);
  const int64_t bound = G == 1 ? std::numeric_limits<int64_t>::max()
                               : tec_fast::checked_mul(G, seq_len, "position_ids", "images * seq_len");
  check_bounds(idx, T, bound, "position_ids", "index");
  Tensor out = at::empty({T, 2}, ic.options());  // [T, 2] = (row, col)
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, T, 1 << 14, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = idx[t] % seq_len;
      const int64_t gw = w[G == 1 ? 0 : idx[t] / seq_len];
      o[2 * t] = j / gw;
      o[2 * t + 1] = j % gw;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tec_fast, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("unkept_row_sum", &unkept_row_sum_cpu);
  m.impl("position_ids", &position_ids_cpu);
}

}  // namespace tec_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tec_fast C++ CPU extension: packing kernels (registered as torch.ops.tec_fast.*) "
            "and plan_bins";
  m.def(
      "plan_bins",
      [](pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast> lengths,
         int64_t capacity) {
        if (lengths.ndim() != 1) {
          throw std::invalid_argument("plan_bins: lengths must be 1-D, got " +
                                      std::to_string(lengths.ndim()) + " dimensions");
        }
        const int64_t* data = lengths.data();
        const int64_t n = lengths.shape(0);
        std::vector<std::vector<int64_t>> bins;
        {
          pybind11::gil_scoped_release no_gil;
          bins = tec_fast::plan_bins(data, n, capacity);
        }
        return bins;
      },
      pybind11::arg("lengths"), pybind11::arg("capacity"),
      "Best-fit-decreasing bins (lists of sequence ids) of int64 lengths; ValueError on a bad "
      "length.");
  m.def("build_facts", [] {
    pybind11::dict d;
    d["torch"] = TORCH_VERSION;
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["compiler"] = __VERSION__;
    return d;
  });
}
