// CUDA kernels of mmfuse::crop_resize. Self-contained (no torch headers): `make cuda-check` compiles this file
// alone with `nvcc -c`, so it cannot rot on machines whose torch is a CPU build.
//
// Layout of the work:
//  - NCHW: one thread per output pixel (k, i, j); it computes the sample position and the four weights once and
//    loops over the channels. Consecutive threads own consecutive j, so every store of a channel plane is
//    coalesced and the four loads of neighbouring threads hit the same cache lines.
//  - channels_last: one thread per output element (k, i, j, c) with c fastest, so loads and stores are coalesced
//    along the channels; the position arithmetic it repeats per channel is a few FLOPs, far below the memory cost.
//  - backward: the same decomposition, scattering into an fp32 (fp64) buffer with atomicAdd.
// Math is fp32 for fp32/fp16/bf16 (fp64 for fp64) and follows the CPU kernel's order of operations.
// Device-side asserts stay on in every build: they are how a bad box or box_index is reported without a host sync.
#ifdef NDEBUG
#undef NDEBUG
#endif
#include <cassert>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/crop_resize_index.h"
#include "cuda/crop_resize_kernel.h"

namespace mmfuse {
namespace cuda {
namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float load(const float* p) { return __ldg(p); }
__device__ __forceinline__ double load(const double* p) { return __ldg(p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Sample along one axis: x = start + (j + 0.5) * (end - start) / out - 0.5 clamped to [0, size - 1].
template <typename acc_t>
struct Sample {
  int lo, hi;
  acc_t frac;
};

template <typename acc_t>
__device__ __forceinline__ Sample<acc_t> sample(acc_t start, acc_t end, int64_t j, int64_t out, int64_t size) {
  const acc_t bin = (end - start) / static_cast<acc_t>(out);
  acc_t x = start + (static_cast<acc_t>(j) + acc_t(0.5)) * bin - acc_t(0.5);
  x = fmin(fmax(x, acc_t(0)), static_cast<acc_t>(size - 1));
  Sample<acc_t> s;
  s.lo = static_cast<int>(x);
  s.hi = s.lo + 1 < size ? s.lo + 1 : static_cast<int>(size - 1);
  s.frac = x - static_cast<acc_t>(s.lo);
  return s;
}

// Box inside the image (up to the tolerance of the Python check, 1e-4 px) with x2 > x1, y2 > y1, finite; index in
// [0, N). A violation is a device-side assert (the same mechanism as torch._assert_async): the launch fails with
// this message instead of reading out of bounds or clamping silently.
template <typename acc_t>
__device__ __forceinline__ bool valid_box(acc_t x1, acc_t y1, acc_t x2, acc_t y2, int64_t n, int64_t N, int64_t H,
                                          int64_t W) {
  const acc_t eps = acc_t(1e-4);
  // Written so that NaN fails every comparison.
  const bool ok = n >= 0 && n < N && x2 > x1 && y2 > y1 && x1 >= -eps && y1 >= -eps &&
                  x2 <= static_cast<acc_t>(W) + eps && y2 <= static_cast<acc_t>(H) + eps;
  assert(ok && "crop_resize: a box is outside the image, has x2 <= x1 or y2 <= y1, or box_index is out of range");
  return ok;
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename scalar_t, typename index_t>
__global__ void forward_nchw_kernel(const scalar_t* __restrict__ images, const typename Acc<scalar_t>::type* __restrict__ boxes,
                                    const int64_t* __restrict__ box_index, scalar_t* __restrict__ out, index_t N,
                                    index_t C, index_t H, index_t W, index_t K, index_t h, index_t w) {
  using acc_t = typename Acc<scalar_t>::type;
  const index_t total = K * h * w;
  const index_t plane_in = H * W, plane_out = h * w;
  for (index_t p = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t j = p % w;
    const index_t i = (p / w) % h;
    const index_t k = p / plane_out;
    const int64_t n = box_index[k];
    scalar_t* o = out + k * C * plane_out + i * w + j;
    const acc_t* b = boxes + 4 * k;
    const acc_t x1 = __ldg(b), y1 = __ldg(b + 1), x2 = __ldg(b + 2), y2 = __ldg(b + 3);
    if (!valid_box(x1, y1, x2, y2, n, N, H, W)) {
      for (index_t c = 0; c < C; ++c) store(o + c * plane_out, quiet_nan<acc_t>());
      continue;
    }
    const Sample<acc_t> sx = sample<acc_t>(x1, x2, j, w, W);
    const Sample<acc_t> sy = sample<acc_t>(y1, y2, i, h, H);
    const scalar_t* src = images + static_cast<index_t>(n) * C * plane_in;
    const index_t oa = sy.lo * W + sx.lo, ob = sy.lo * W + sx.hi, oc = sy.hi * W + sx.lo, od = sy.hi * W + sx.hi;
#pragma unroll 4
    for (index_t c = 0; c < C; ++c) {
      const scalar_t* s = src + c * plane_in;
      const acc_t a = load(s + oa), bb = load(s + ob), cc = load(s + oc), d = load(s + od);
      const acc_t top = a + sx.frac * (bb - a);
      const acc_t bottom = cc + sx.frac * (d - cc);
      store(o + c * plane_out, top + sy.frac * (bottom - top));
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void forward_nhwc_kernel(const scalar_t* __restrict__ images, const typename Acc<scalar_t>::type* __restrict__ boxes,
                                    const int64_t* __restrict__ box_index, scalar_t* __restrict__ out, index_t N,
                                    index_t C, index_t H, index_t W, index_t K, index_t h, index_t w) {
  using acc_t = typename Acc<scalar_t>::type;
  const index_t total = K * h * w * C;
  for (index_t p = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = p % C;
    const index_t pix = p / C;
    const index_t j = pix % w;
    const index_t i = (pix / w) % h;
    const index_t k = pix / (w * h);
    const int64_t n = box_index[k];
    const acc_t* b = boxes + 4 * k;
    const acc_t x1 = __ldg(b), y1 = __ldg(b + 1), x2 = __ldg(b + 2), y2 = __ldg(b + 3);
    if (!valid_box(x1, y1, x2, y2, n, N, H, W)) {
      store(out + p, quiet_nan<acc_t>());
      continue;
    }
    const Sample<acc_t> sx = sample<acc_t>(x1, x2, j, w, W);
    const Sample<acc_t> sy = sample<acc_t>(y1, y2, i, h, H);
    const scalar_t* s = images + static_cast<index_t>(n) * H * W * C + c;
    const acc_t a = load(s + (sy.lo * W + sx.lo) * C), bb = load(s + (sy.lo * W + sx.hi) * C);
    const acc_t cc = load(s + (sy.hi * W + sx.lo) * C), d = load(s + (sy.hi * W + sx.hi) * C);
    const acc_t top = a + sx.frac * (bb - a);
    const acc_t bottom = cc + sx.frac * (d - cc);
    store(out + p, top + sy.frac * (bottom - top));
  }
}

template <typename scalar_t, typename index_t>
__global__ void backward_nchw_kernel(const scalar_t* __restrict__ grad_out, const typename Acc<scalar_t>::type* __restrict__ boxes,
                                     const int64_t* __restrict__ box_index, typename Acc<scalar_t>::type* __restrict__ grad,
                                     index_t N, index_t C, index_t H, index_t W, index_t K, index_t h, index_t w) {
  using acc_t = typename Acc<scalar_t>::type;
  const index_t total = K * h * w;
  const index_t plane_in = H * W, plane_out = h * w;
  for (index_t p = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t j = p % w;
    const index_t i = (p / w) % h;
    const index_t k = p / plane_out;
    const int64_t n = box_index[k];
    const acc_t* b = boxes + 4 * k;
    const acc_t x1 = __ldg(b), y1 = __ldg(b + 1), x2 = __ldg(b + 2), y2 = __ldg(b + 3);
    if (!valid_box(x1, y1, x2, y2, n, N, H, W)) continue;
    const Sample<acc_t> sx = sample<acc_t>(x1, x2, j, w, W);
    const Sample<acc_t> sy = sample<acc_t>(y1, y2, i, h, H);
    const acc_t wa = (acc_t(1) - sy.frac) * (acc_t(1) - sx.frac), wb = (acc_t(1) - sy.frac) * sx.frac;
    const acc_t wc = sy.frac * (acc_t(1) - sx.frac), wd = sy.frac * sx.frac;
    const index_t oa = sy.lo * W + sx.lo, ob = sy.lo * W + sx.hi, oc = sy.hi * W + sx.lo, od = sy.hi * W + sx.hi;
    const scalar_t* g = grad_out + k * C * plane_out + i * w + j;
    acc_t* dst = grad + static_cast<index_t>(n) * C * plane_in;
    for (index_t c = 0; c < C; ++c) {
      const acc_t v = load(g + c * plane_out);
      acc_t* d = dst + c * plane_in;
      atomicAdd(d + oa, wa * v);
      atomicAdd(d + ob, wb * v);
      atomicAdd(d + oc, wc * v);
      atomicAdd(d + od, wd * v);
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void backward_nhwc_kernel(const scalar_t* __restrict__ grad_out, const typename Acc<scalar_t>::type* __restrict__ boxes,
                                     const int64_t* __restrict__ box_index, typename Acc<scalar_t>::type* __restrict__ grad,
                                     index_t N, index_t C, index_t H, index_t W, index_t K, index_t h, index_t w) {
  using acc_t = typename Acc<scalar_t>::type;
  const index_t total = K * h * w * C;
  for (index_t p = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = p % C;
    const index_t pix = p / C;
    const index_t j = pix % w;
    const index_t i = (pix / w) % h;
    const index_t k = pix / (w * h);
    const int64_t n = box_index[k];
    const acc_t* b = boxes + 4 * k;
    const acc_t x1 = __ldg(b), y1 = __ldg(b + 1), x2 = __ldg(b + 2), y2 = __ldg(b + 3);
    if (!valid_box(x1, y1, x2, y2, n, N, H, W)) continue;
    const Sample<acc_t> sx = sample<acc_t>(x1, x2, j, w, W);
    const Sample<acc_t> sy = sample<acc_t>(y1, y2, i, h, H);
    const acc_t v = load(grad_out + p);
    acc_t* d = grad + static_cast<index_t>(n) * H * W * C + c;
    atomicAdd(d + (sy.lo * W + sx.lo) * C, (acc_t(1) - sy.frac) * (acc_t(1) - sx.frac) * v);
    atomicAdd(d + (sy.lo * W + sx.hi) * C, (acc_t(1) - sy.frac) * sx.frac * v);
    atomicAdd(d + (sy.hi * W + sx.lo) * C, sy.frac * (acc_t(1) - sx.frac) * v);
    atomicAdd(d + (sy.hi * W + sx.hi) * C, sy.frac * sx.frac * v);
  }
}

inline unsigned grid_for(int64_t work) { return static_cast<unsigned>(blocks_for(work)); }

// Items of one grid-stride loop: one per output element channels_last, one per output pixel (all channels) NCHW.
inline int64_t loop_work(bool channels_last, int64_t C, int64_t K, int64_t h, int64_t w) {
  return channels_last ? K * h * w * C : K * h * w;
}

template <typename scalar_t, typename index_t>
void launch_forward(bool channels_last, const void* images, const void* boxes, const int64_t* box_index, void* out,
                    int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t h, int64_t w, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto* img = static_cast<const scalar_t*>(images);
  const auto* bx = static_cast<const acc_t*>(boxes);
  auto* o = static_cast<scalar_t*>(out);
  const unsigned grid = grid_for(loop_work(channels_last, C, K, h, w));
  if (channels_last) {
    forward_nhwc_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
        img, bx, box_index, o, N, C, H, W, K, h, w);
  } else {
    forward_nchw_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
        img, bx, box_index, o, N, C, H, W, K, h, w);
  }
}

template <typename scalar_t, typename index_t>
void launch_backward(bool channels_last, const void* grad_out, const void* boxes, const int64_t* box_index,
                     void* grad_acc, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t h, int64_t w,
                     cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const auto* g = static_cast<const scalar_t*>(grad_out);
  const auto* bx = static_cast<const acc_t*>(boxes);
  auto* acc = static_cast<acc_t*>(grad_acc);
  const unsigned grid = grid_for(loop_work(channels_last, C, K, h, w));
  if (channels_last) {
    backward_nhwc_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
        g, bx, box_index, acc, N, C, H, W, K, h, w);
  } else {
    backward_nchw_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
        g, bx, box_index, acc, N, C, H, W, K, h, w);
  }
}

// 32-bit index arithmetic when every offset and the loop counter fit (the common case; integer division is much
// cheaper), else 64-bit.
inline bool use_int32(bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t h,
                      int64_t w) {
  return fits_int32(N * C * H * W, K * C * h * w, loop_work(channels_last, C, K, h, w));
}

template <typename scalar_t>
void forward_typed(bool channels_last, const void* images, const void* boxes, const int64_t* box_index, void* out,
                   int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t h, int64_t w, cudaStream_t stream) {
  if (use_int32(channels_last, N, C, H, W, K, h, w)) {
    launch_forward<scalar_t, int32_t>(channels_last, images, boxes, box_index, out, N, C, H, W, K, h, w, stream);
  } else {
    launch_forward<scalar_t, int64_t>(channels_last, images, boxes, box_index, out, N, C, H, W, K, h, w, stream);
  }
}

template <typename scalar_t>
void backward_typed(bool channels_last, const void* grad_out, const void* boxes, const int64_t* box_index,
                    void* grad_acc, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t h, int64_t w,
                    cudaStream_t stream) {
  if (use_int32(channels_last, N, C, H, W, K, h, w)) {
    launch_backward<scalar_t, int32_t>(channels_last, grad_out, boxes, box_index, grad_acc, N, C, H, W, K, h, w,
                                       stream);
  } else {
    launch_backward<scalar_t, int64_t>(channels_last, grad_out, boxes, box_index, grad_acc, N, C, H, W, K, h, w,
                                       stream);
  }
}

}  // namespace

cudaError_t crop_resize_forward(DType dtype, bool channels_last, const void* images, const void* boxes,
                                const int64_t* box_index, void* out, int64_t N, int64_t C, int64_t H, int64_t W,
                                int64_t K, int64_t out_h, int64_t out_w, cudaStream_t stream) {
  if (K == 0 || C == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      forward_typed<float>(channels_last, images, boxes, box_index, out, N, C, H, W, K, out_h, out_w, stream);
      break;
    case DType::kFloat64:
      forward_typed<double>(channels_last, images, boxes, box_index, out, N, C, H, W, K, out_h, out_w, stream);
      break;
    case DType::kFloat16:
      forward_typed<__half>(channels_last, images, boxes, box_index, out, N, C, H, W, K, out_h, out_w, stream);
      break;
    case DType::kBFloat16:
      forward_typed<__nv_bfloat16>(channels_last, images, boxes, box_index, out, N, C, H, W, K, out_h, out_w,
                                   stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t crop_resize_backward(DType dtype, bool channels_last, const void* grad_out, const void* boxes,
                                 const int64_t* box_index, void* grad_acc, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t K, int64_t out_h, int64_t out_w, cudaStream_t stream) {
  if (K == 0 || C == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      backward_typed<float>(channels_last, grad_out, boxes, box_index, grad_acc, N, C, H, W, K, out_h, out_w, stream);
      break;
    case DType::kFloat64:
      backward_typed<double>(channels_last, grad_out, boxes, box_index, grad_acc, N, C, H, W, K, out_h, out_w,
                             stream);
      break;
    case DType::kFloat16:
      backward_typed<__half>(channels_last, grad_out, boxes, box_index, grad_acc, N, C, H, W, K, out_h, out_w,
                             stream);
      break;
    case DType::kBFloat16:
      backward_typed<__nv_bfloat16>(channels_last, grad_out, boxes, box_index, grad_acc, N, C, H, W, K, out_h, out_w,
                                    stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfuse
