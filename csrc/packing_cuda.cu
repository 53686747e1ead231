// CUDA kernels of tec_fast.packing; see packing_cuda.h for the contracts. Raw pointers only.
#include "packing_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace tec_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

int64_t blocks_for(int64_t work, int64_t per_block) {
  const int64_t n = (work + per_block - 1) / per_block;
  return std::max<int64_t>(1, std::min<int64_t>(n, 65535LL * 8));  // grid-stride loops do the rest
}

// Inclusive scan of `v` across the block (kThreads threads); *total gets the block's sum.
template <typename T>
__device__ T block_inclusive_scan(T v, T* total) {
  __shared__ T warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += y;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < kWarps ? warp_sums[lane] : T(0);
    for (int o = 1; o < kWarps; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return v;
}

__global__ void count_kept_kernel(const bool* __restrict__ keep, int64_t L, int64_t* counts) {
  const bool* row = keep + static_cast<int64_t>(blockIdx.x) * L;
  int64_t n = 0;
  for (int64_t j = threadIdx.x; j < L; j += kThreads) n += row[j];
  int64_t total;
  block_inclusive_scan<int64_t>(n, &total);
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

__global__ void scan_counts_kernel(const int64_t* __restrict__ counts, int64_t B,
                                   int32_t* __restrict__ cu_seqlens, int64_t* __restrict__ stats) {
  __shared__ int64_t max_part[kThreads];
  int64_t carry = 0, max_len = 0;
  if (threadIdx.x == 0) cu_seqlens[0] = 0;
  for (int64_t base = 0; base < B; base += kThreads) {
    const int64_t b = base + threadIdx.x;
    const int64_t c = b < B ? counts[b] : 0;
    max_len = max(max_len, c);
    int64_t total;
    const int64_t incl = block_inclusive_scan<int64_t>(c, &total);
    if (b < B) cu_seqlens[b + 1] = static_cast<int32_t>(carry + incl);
    carry += total;
  }
  max_part[threadIdx.x] = max_len;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kThreads; ++i) max_len = max(max_len, max_part[i]);
    stats[0] = carry;
    stats[1] = max_len;
  }
}

__global__ void kept_index_kernel(const bool* __restrict__ keep, int64_t L,
                                  const int32_t* __restrict__ cu_seqlens, int64_t* __restrict__ index) {
  const int64_t b = blockIdx.x;
  const bool* row = keep + b * L;
  int64_t offset = cu_seqlens[b];
  for (int64_t base = 0; base < L; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const int k = j < L ? static_cast<int>(row[j]) : 0;
    int total;
    const int incl = block_inclusive_scan<int>(k, &total);
    if (k) index[offset + incl - 1] = b * L + j;
    offset += total;
  }
}

// Rows are copied as `Word`s (16, 8, 4, 2 or 1 bytes, the widest that the row size and the
// pointers' alignment allow), so one kernel serves every dtype.
template <typename Word>
__global__ void gather_rows_kernel(const Word* __restrict__ src, int64_t n_src,
                                   const int64_t* __restrict__ index, int64_t T, int64_t words,
                                   Word* __restrict__ out) {
  const int64_t total = T * words;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / words, w = i - t * words;
    const int64_t r = index[t];
    Word v;
    if (r >= 0 && r < n_src) {
      v = src[r * words + w];
    } else {
      memset(&v, 0, sizeof(Word));
    }
    out[i] = v;
  }
}

template <typename Word>
__global__ void scatter_rows_kernel(const Word* __restrict__ packed, const int64_t* __restrict__ inv,
                                    int64_t N, const Word* __restrict__ fill, int64_t words,
                                    Word* __restrict__ out) {
  const int64_t total = N * words;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / words, w = i - r * words;
    const int64_t t = inv[r];
    Word v;
    if (t >= 0) {
      v = packed[t * words + w];
    } else if (fill != nullptr) {
      v = fill[w];
    } else {
      memset(&v, 0, sizeof(Word));
    }
    out[i] = v;
  }
}

__global__ void inverse_index_kernel(const int64_t* __restrict__ index, int64_t T, int64_t N,
                                     int64_t* inv) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = index[t];
    if (r >= 0 && r < N) {
      atomicMax(reinterpret_cast<long long*>(inv + r), static_cast<long long>(t));
    }
  }
}

template <typename T, typename Acc> __device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(v);
}
template <> __device__ __forceinline__ float to_acc<__half, float>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16, float>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T, typename Acc> __device__ __forceinline__ T from_acc(Acc v) {
  return static_cast<T>(v);
}
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}

constexpr int kRowsPerBlock = 64;

// grid (column blocks, row blocks): each thread sums one column over its row blocks, then
// one atomicAdd per thread into the fp32 (fp64) accumulator.
template <typename T, typename Acc>
__global__ void unkept_row_sum_kernel(const T* __restrict__ grad, const int64_t* __restrict__ inv,
                                      int64_t N, int64_t C, Acc* __restrict__ acc) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  Acc s = 0;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock; r0 < N;
       r0 += static_cast<int64_t>(gridDim.y) * kRowsPerBlock) {
    const int64_t r1 = min(N, r0 + kRowsPerBlock);
    for (int64_t r = r0; r < r1; ++r) {
      if (inv[r] < 0) s += to_acc<T, Acc>(grad[r * C + c]);
    }
  }
  atomicAdd(acc + c, s);
}

template <typename T, typename Acc>
__global__ void cast_kernel(const Acc* __restrict__ acc, int64_t C, T* __restrict__ out) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < C) out[c] = from_acc<T, Acc>(acc[c]);
}

template <typename T, typename Acc>
cudaError_t launch_unkept_row_sum(const void* grad, const int64_t* inv, int64_t N, int64_t C,
                                  void* acc, void* out, cudaStream_t s) {
  if (C == 0) return cudaSuccess;
  const unsigned col_blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  if (N > 0) {
    const int64_t row_blocks = std::min<int64_t>((N + kRowsPerBlock - 1) / kRowsPerBlock, 65535);
    unkept_row_sum_kernel<T, Acc><<<dim3(col_blocks, static_cast<unsigned>(row_blocks)), kThreads,
                                    0, s>>>(static_cast<const T*>(grad), inv, N, C,
                                            static_cast<Acc*>(acc));
  }
  cast_kernel<T, Acc><<<col_blocks, kThreads, 0, s>>>(static_cast<const Acc*>(acc), C,
                                                      static_cast<T*>(out));
  return cudaGetLastError();
}

__global__ void position_ids_kernel(const int64_t* __restrict__ index, int64_t T, int64_t seq_len,
                                    const int64_t* __restrict__ grid_w, int64_t n_grid,
                                    int64_t* __restrict__ out) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = index[t];
    const int64_t b = n_grid == 1 ? 0 : min(max(i / seq_len, int64_t(0)), n_grid - 1);
    const int64_t w = max(grid_w[b], int64_t(1));
    const int64_t j = i % seq_len;
    out[2 * t] = j / w;
    out[2 * t + 1] = j % w;
  }
}

// Widest word that divides the row and every pointer's alignment.
int word_bytes(int64_t row_bytes, const void* a, const void* b, const void* c) {
  const auto addr_bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                         reinterpret_cast<uintptr_t>(c);
  for (int w = 16; w > 1; w >>= 1) {
    if (row_bytes % w == 0 && addr_bits % w == 0) return w;
  }
  return 1;
}

template <typename Word>
cudaError_t launch_gather(const void* src, int64_t n_src, const int64_t* index, int64_t T,
                          int64_t row_bytes, void* out, cudaStream_t s) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  gather_rows_kernel<Word><<<blocks_for(T * words, kThreads), kThreads, 0, s>>>(
      static_cast<const Word*>(src), n_src, index, T, words, static_cast<Word*>(out));
  return cudaGetLastError();
}

template <typename Word>
cudaError_t launch_scatter(const void* packed, const int64_t* inv, int64_t N, const void* fill,
                           int64_t row_bytes, void* out, cudaStream_t s) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  scatter_rows_kernel<Word><<<blocks_for(N * words, kThreads), kThreads, 0, s>>>(
      static_cast<const Word*>(packed), inv, N, static_cast<const Word*>(fill), words,
      static_cast<Word*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t count_kept(const bool* keep, int64_t B, int64_t L, int64_t* counts, cudaStream_t s) {
  if (B == 0) return cudaSuccess;
  if (B > 2147483647LL) return cudaErrorInvalidConfiguration;
  count_kept_kernel<<<static_cast<unsigned>(B), kThreads, 0, s>>>(keep, L, counts);
  return cudaGetLastError();
}

cudaError_t scan_counts(const int64_t* counts, int64_t B, int32_t* cu_seqlens, int64_t* stats,
                        cudaStream_t s) {
  scan_counts_kernel<<<1, kThreads, 0, s>>>(counts, B, cu_seqlens, stats);
  return cudaGetLastError();
}

cudaError_t kept_index(const bool* keep, int64_t B, int64_t L, const int32_t* cu_seqlens,
                       int64_t* index, cudaStream_t s) {
  if (B == 0) return cudaSuccess;
  if (B > 2147483647LL) return cudaErrorInvalidConfiguration;
  kept_index_kernel<<<static_cast<unsigned>(B), kThreads, 0, s>>>(keep, L, cu_seqlens, index);
  return cudaGetLastError();
}

cudaError_t gather_rows(const void* src, int64_t n_src, const int64_t* index, int64_t T,
                        int64_t row_bytes, void* out, cudaStream_t s) {
  if (T == 0 || row_bytes == 0) return cudaSuccess;
  switch (word_bytes(row_bytes, src, out, nullptr)) {
    case 16: return launch_gather<uint4>(src, n_src, index, T, row_bytes, out, s);
    case 8: return launch_gather<uint2>(src, n_src, index, T, row_bytes, out, s);
    case 4: return launch_gather<uint32_t>(src, n_src, index, T, row_bytes, out, s);
    case 2: return launch_gather<uint16_t>(src, n_src, index, T, row_bytes, out, s);
    default: return launch_gather<uint8_t>(src, n_src, index, T, row_bytes, out, s);
  }
}

cudaError_t inverse_index(const int64_t* index, int64_t T, int64_t N, int64_t* inv,
                          cudaStream_t s) {
  if (T == 0 || N == 0) return cudaSuccess;
  inverse_index_kernel<<<blocks_for(T, kThreads), kThreads, 0, s>>>(index, T, N, inv);
  return cudaGetLastError();
}

cudaError_t scatter_rows(const void* packed, const int64_t* inv, int64_t N, const void* fill,
                         int64_t row_bytes, void* out, cudaStream_t s) {
  if (N == 0 || row_bytes == 0) return cudaSuccess;
  switch (word_bytes(row_bytes, packed, out, fill)) {
    case 16: return launch_scatter<uint4>(packed, inv, N, fill, row_bytes, out, s);
    case 8: return launch_scatter<uint2>(packed, inv, N, fill, row_bytes, out, s);
    case 4: return launch_scatter<uint32_t>(packed, inv, N, fill, row_bytes, out, s);
    case 2: return launch_scatter<uint16_t>(packed, inv, N, fill, row_bytes, out, s);
    default: return launch_scatter<uint8_t>(packed, inv, N, fill, row_bytes, out, s);
  }
}

cudaError_t unkept_row_sum(FloatType type, const void* grad, const int64_t* inv, int64_t N,
                           int64_t C, void* acc, void* out, cudaStream_t s) {
  switch (type) {
    case FloatType::kFloat32: return launch_unkept_row_sum<float, float>(grad, inv, N, C, acc, out, s);
    case FloatType::kFloat64: return launch_unkept_row_sum<double, double>(grad, inv, N, C, acc, out, s);
    case FloatType::kFloat16: return launch_unkept_row_sum<__half, float>(grad, inv, N, C, acc, out, s);
    case FloatType::kBFloat16:
      return launch_unkept_row_sum<__nv_bfloat16, float>(grad, inv, N, C, acc, out, s);
  }
  return cudaErrorInvalidValue;
}

cudaError_t position_ids(const int64_t* index, int64_t T, int64_t seq_len, const int64_t* grid_w,
                         int64_t n_grid, int64_t* out, cudaStream_t s) {
  if (T == 0) return cudaSuccess;
  if (seq_len <= 0 || n_grid <= 0) return cudaErrorInvalidValue;
  position_ids_kernel<<<blocks_for(T, kThreads), kThreads, 0, s>>>(index, T, seq_len, grid_w,
                                                                   n_grid, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tec_fast
