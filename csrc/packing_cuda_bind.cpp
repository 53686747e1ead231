// CUDA kernels of tec_fast.packing bound to the `tec_fast::` operators under the CUDA dispatch
// key (schemas, fake and autograd formulas: tec_fast/packing/library.py). Built only where torch has
// CUDA; the kernels themselves are raw-pointer code in packing_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <limits>

#include "checked_math.h"

#include "packing_cuda.h"

namespace tec_fast {
namespace {

using at::Tensor;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "tec_fast CUDA ", what, ": ", cudaGetErrorString(err));
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but the data is on ", ref.device());
}

void check_index_tensor(const Tensor& index, const char* op, const char* name) {
  TORCH_CHECK_VALUE(index.dim() == 1 && index.scalar_type() == at::kLong, op, ": ", name,
                    " must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ",
                    index.sizes());
}

cuda::FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::FloatType::kFloat32;
    case at::kDouble: return cuda::FloatType::kFloat64;
    case at::kHalf: return cuda::FloatType::kFloat16;
    case at::kBFloat16: return cuda::FloatType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "tec_fast CUDA: unsupported dtype ", t);
  }
}

// inv [N]: packed row landing at each flat position, or -1.
Tensor inverse_index(const Tensor& index, int64_t N, cudaStream_t stream) {
  Tensor inv = at::full({N}, -1, index.options());
  check(cuda::inverse_index(index.const_data_ptr<int64_t>(), index.size(0), N,
                            inv.data_ptr<int64_t>(), stream),
        "inverse_index");
  return inv;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pack_cuda(const Tensor& x, const Tensor& keep) {
  TORCH_CHECK_VALUE(x.dim() == 3, "pack: x must be [B, L, C], got shape ", x.sizes());
  check_cuda(keep, x, "pack", "keep");
  TORCH_CHECK_VALUE(keep.scalar_type() == at::kBool && keep.dim() == 2 &&
                        keep.size(0) == x.size(0) && keep.size(1) == x.size(1),
                    "pack: keep must be a bool [B, L] mask matching x ", x.sizes(), ", got ",
                    keep.scalar_type(), " of shape ", keep.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const Tensor xc = x.contiguous();
  const Tensor kc = keep.contiguous();
  const bool* k = kc.const_data_ptr<bool>();

  Tensor counts = at::empty({B}, kc.options().dtype(at::kLong));
  Tensor cu_seqlens = at::empty({B + 1}, kc.options().dtype(at::kInt));  // [B+1]
  Tensor stats = at::empty({2}, kc.options().dtype(at::kLong));         // {T, max_len}
  check(cuda::count_kept(k, B, L, counts.data_ptr<int64_t>(), stream), "count_kept");
  check(cuda::scan_counts(counts.const_data_ptr<int64_t>(), B, cu_seqlens.data_ptr<int32_t>(),
                          stats.data_ptr<int64_t>(), stream),
        "scan_counts");
  // The one host sync of pack: T sizes the outputs (torch's boolean indexing syncs here too).
  const Tensor host = stats.cpu();
  const int64_t T = host.const_data_ptr<int64_t>()[0];
  const int64_t max_len = host.const_data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(T <= std::numeric_limits<int32_t>::max(), "pack: ", T,
                    " kept tokens overflow the int32 cu_seqlens");

  Tensor index = at::empty({T}, kc.options().dtype(at::kLong));  // [T]
  Tensor packed = at::empty({T, C}, xc.options());               // [T, C]
  check(cuda::kept_index(k, B, L, cu_seqlens.const_data_ptr<int32_t>(), index.data_ptr<int64_t>(),
                         stream),
        "kept_index");
  check(cuda::gather_rows(xc.const_data_ptr(), B * L, index.const_data_ptr<int64_t>(), T,
                          C * static_cast<int64_t>(xc.element_size()), packed.data_ptr(), stream),
        "gather_rows");
  return {packed, cu_seqlens, index, at::scalar_tensor(max_len, at::kLong)};
}

Tensor unpack_cuda(const Tensor& packed, const Tensor& index, const Tensor& fill, int64_t B,
                   int64_t L) {
  TORCH_CHECK_VALUE(packed.dim() == 2, "unpack: packed must be [T, C], got shape ", packed.sizes());
  check_index_tensor(index, "unpack", "index");
  check_cuda(index, packed, "unpack", "index");
  check_cuda(fill, packed, "unpack", "fill");
  const int64_t T = packed.size(0), C = packed.size(1);
  TORCH_CHECK_VALUE(index.size(0) == T, "unpack: index must have T = ", T, " entries, got ",
                    index.size(0));
  TORCH_CHECK_VALUE(fill.dim() == 1 && fill.size(0) == C && fill.scalar_type() == packed.scalar_type(),
                    "unpack: fill must be [C = ", C, "] of dtype ", packed.scalar_type(), ", got ",
                    fill.scalar_type(), " of shape ", fill.sizes());
  TORCH_CHECK_VALUE(B >= 0 && L >= 0, "unpack: (B, L) must be non-negative, got (", B, ", ", L, ")");
  const c10::cuda::CUDAGuard guard(packed.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor pc = packed.contiguous();
  const Tensor ic = index.contiguous();
  const Tensor fc = fill.contiguous();
  const int64_t N = tec_fast::checked_mul(B, L, "unpack", "B * L");
  tec_fast::checked_mul(N, C, "unpack", "B * L * C");
  const Tensor inv = inverse_index(ic, N, stream);
  Tensor out = at::empty({B, L, C}, pc.options());  // [B, L, C]
  check(cuda::scatter_rows(pc.const_data_ptr(), inv.const_data_ptr<int64_t>(), N,
                           fc.const_data_ptr(), C * static_cast<int64_t>(pc.element_size()),
                           out.data_ptr(), stream),
        "scatter_rows");
  return out;
}

Tensor gather_rows_cuda(const Tensor& src, const Tensor& index) {
  TORCH_CHECK_VALUE(src.dim() == 2, "gather_rows: src must be [N, C], got shape ", src.sizes());
  check_index_tensor(index, "gather_rows", "index");
  check_cuda(index, src, "gather_rows", "index");
  const c10::cuda::CUDAGuard guard(src.device());
  const Tensor sc = src.contiguous();
  const Tensor ic = index.contiguous();
  Tensor out = at::empty({ic.size(0), sc.size(1)}, sc.options());  // [T, C]
  check(cuda::gather_rows(sc.const_data_ptr(), sc.size(0), ic.const_data_ptr<int64_t>(), ic.size(0),
                          sc.size(1) * static_cast<int64_t>(sc.element_size()), out.data_ptr(),
                          c10::cuda::getCurrentCUDAStream()),
        "gather_rows");
  return out;
}

Tensor unkept_row_sum_cuda(const Tensor& grad, const Tensor& index) {
  TORCH_CHECK_VALUE(grad.dim() == 2, "unkept_row_sum: grad must be [N, C], got shape ",
                    grad.sizes());
  check_index_tensor(index, "unkept_row_sum", "index");
  check_cuda(index, grad, "unkept_row_sum", "index");
  const c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor gc = grad.contiguous();
  const Tensor ic = index.contiguous();
  const int64_t N = gc.size(0), C = gc.size(1);
  const Tensor inv = inverse_index(ic, N, stream);
  const auto acc_dtype = gc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor acc = at::zeros({C}, gc.options().dtype(acc_dtype));
  Tensor out = at::empty({C}, gc.options());  // [C]
  check(cuda::unkept_row_sum(float_type(gc.scalar_type()), gc.const_data_ptr(),
                             inv.const_data_ptr<int64_t>(), N, C, acc.data_ptr(), out.data_ptr(),
                             stream),
        "unkept_row_sum");
  return out;
}

Tensor position_ids_cuda(const Tensor& index, int64_t seq_len, const Tensor& grid_w) {
  check_index_tensor(index, "position_ids", "index");
  check_index_tensor(grid_w, "position_ids", "grid_w");
  check_cuda(grid_w, index, "position_ids", "grid_w");
  TORCH_CHECK_VALUE(seq_len > 0, "position_ids: seq_len must be positive, got ", seq_len);
  TORCH_CHECK_VALUE(grid_w.size(0) >= 1, "position_ids: grid_w must hold at least one width");
  const c10::cuda::CUDAGuard guard(index.device());
  const Tensor ic = index.contiguous();
  const Tensor wc = grid_w.contiguous();
  Tensor out = at::empty({ic.size(0), 2}, ic.options());  // [T, 2] = (row, col)
  check(cuda::position_ids(ic.const_data_ptr<int64_t>(), ic.size(0), seq_len,
                           wc.const_data_ptr<int64_t>(), wc.size(0), out.data_ptr<int64_t>(),
                           c10::cuda::getCurrentCUDAStream()),
        "position_ids");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tec_fast, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("unkept_row_sum", &unkept_row_sum_cuda);
  m.impl("position_ids", &position_ids_cuda);
}

}  // namespace tec_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tec_fast CUDA extension: packing kernels registered as torch.ops.tec_fast.*";
  m.def("cuda_runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
}
