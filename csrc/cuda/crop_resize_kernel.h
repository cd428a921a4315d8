// Plain C++ interface of the CUDA kernels of mmfuse::crop_resize (no torch headers, so that
// crop_resize_kernel.cu compiles on its own with `nvcc -c`; the torch glue is crop_resize_cuda.cpp).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mmfuse {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// out (K, C, h, w) = crop_resize(images (N, C, H, W), boxes (K, 4), box_index (K,)).
// images and out are dense in NCHW order, or in NHWC order when channels_last is true. boxes hold
// (x1, y1, x2, y2) as float (double for kFloat64). The kernels check every box (inside the image up to 1e-4 px,
// x2 > x1, y2 > y1, box_index in [0, N)) with a device-side assert: no host sync, no out-of-bounds read.
cudaError_t crop_resize_forward(DType dtype, bool channels_last, const void* images, const void* boxes,
                                const int64_t* box_index, void* out, int64_t N, int64_t C, int64_t H, int64_t W,
                                int64_t K, int64_t out_h, int64_t out_w, cudaStream_t stream);

// grad_acc (N, C, H, W), zero-initialized by the caller, float (double for kFloat64), same layout as grad_out,
// receives the bilinear scatter of grad_out (K, C, h, w) through atomics. Boxes are checked as in the forward.
cudaError_t crop_resize_backward(DType dtype, bool channels_last, const void* grad_out, const void* boxes,
                                 const int64_t* box_index, void* grad_acc, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t K, int64_t out_h, int64_t out_w, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmfuse
