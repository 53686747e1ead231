// CUDA kernels of tec_fast.packing on raw pointers: no torch headers, so plain
// `nvcc -c -arch=sm_90 packing_cuda.cu` compiles them on machines without a GPU or a CUDA torch.
// The binding (packing_cuda_bind.cpp) allocates every buffer with torch and passes the stream.
// Every launcher returns the launch's cudaError_t (cudaSuccess when there was nothing to do).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tec_fast {
namespace cuda {

enum class FloatType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// keep [B, L] (bool, one byte each) -> counts [B] kept tokens per image.
cudaError_t count_kept(const bool* keep, int64_t B, int64_t L, int64_t* counts, cudaStream_t s);

// counts [B] -> cu_seqlens [B+1] (int32, exclusive prefix sums with the total last) and
// stats [2] = {T, max_len} (int64). One block; B may be any size.
cudaError_t scan_counts(const int64_t* counts, int64_t B, int32_t* cu_seqlens, int64_t* stats,
                        cudaStream_t s);

// index [T] = flat positions b*L+j of kept tokens, images in batch order, tokens in patch order.
cudaError_t kept_index(const bool* keep, int64_t B, int64_t L, const int32_t* cu_seqlens,
                       int64_t* index, cudaStream_t s);

// out[t] = src[index[t]] for rows of row_bytes bytes; an index outside [0, n_src) gives a zero
// row (no out-of-bounds read).
cudaError_t gather_rows(const void* src, int64_t n_src, const int64_t* index, int64_t T,
                        int64_t row_bytes, void* out, cudaStream_t s);

// inv [N] (pre-filled with -1 by the caller) <- inv[index[t]] = t; out-of-range entries are
// skipped; when a position repeats, the largest t wins (deterministic).
cudaError_t inverse_index(const int64_t* index, int64_t T, int64_t N, int64_t* inv,
                          cudaStream_t s);

// out[r] = packed[inv[r]] where inv[r] >= 0, else the fill row (zeros when fill is null).
cudaError_t scatter_rows(const void* packed, const int64_t* inv, int64_t N, const void* fill,
                         int64_t row_bytes, void* out, cudaStream_t s);

// out[c] = sum over rows r with inv[r] < 0 of grad[r, c]; grad [N, C] and out [C] of `type`.
// acc [C] is float (double for kFloat64) workspace that the caller zeroes.
cudaError_t unkept_row_sum(FloatType type, const void* grad, const int64_t* inv, int64_t N,
                           int64_t C, void* acc, void* out, cudaStream_t s);

// out [T, 2] = (j / w, j % w), j = index % seq_len, w = grid_w[n_grid == 1 ? 0 : index / seq_len].
cudaError_t position_ids(const int64_t* index, int64_t T, int64_t seq_len, const int64_t* grid_w,
                         int64_t n_grid, int64_t* out, cudaStream_t s);

}  // namespace cuda
}  // namespace tec_fast
