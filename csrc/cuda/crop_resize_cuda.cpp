// torch glue of the CUDA kernels of mmfuse::crop_resize (compiled only in CUDA builds, see setup.py).
#ifdef MMFUSE_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "crop_resize_common.h"
#include "cuda/crop_resize_kernel.h"

namespace mmfuse {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "crop_resize: unsupported dtype ", t);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Box values and box_index range are not read here (that would synchronize with the host): the kernels check
// them with device-side asserts.
at::Tensor crop_resize_cuda(const at::Tensor& images_in, const at::Tensor& boxes_in, const at::Tensor& box_index_in,
                            int64_t out_h, int64_t out_w) {
  check_forward_args(images_in, boxes_in, box_index_in, out_h, out_w);
  TORCH_CHECK(images_in.is_cuda(), "crop_resize_cuda: expected CUDA tensors");
  c10::cuda::CUDAGuard guard(images_in.device());
  const bool channels_last = use_channels_last(images_in);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor images = images_in.contiguous(format);
  const at::Tensor boxes = boxes_in.to(acc_type(images.scalar_type())).contiguous();
  const at::Tensor box_index = box_index_in.contiguous();
  const int64_t K = boxes.size(0);
  at::Tensor out = at::empty({K, images.size(1), out_h, out_w}, images.options().memory_format(format));
  C10_CUDA_CHECK(cuda::crop_resize_forward(to_kernel_dtype(images.scalar_type()), channels_last,
                                           images.const_data_ptr(), boxes.const_data_ptr(),
                                           box_index.const_data_ptr<int64_t>(), out.mutable_data_ptr(),
                                           images.size(0), images.size(1), images.size(2), images.size(3), K, out_h,
                                           out_w, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor crop_resize_backward_cuda(const at::Tensor& grad_in, const at::Tensor& boxes_in,
                                     const at::Tensor& box_index_in, int64_t n, int64_t height, int64_t width) {
  check_backward_args(grad_in, boxes_in, box_index_in, n, height, width);
  TORCH_CHECK(grad_in.is_cuda(), "crop_resize_backward_cuda: expected CUDA tensors");
  c10::cuda::CUDAGuard guard(grad_in.device());
  const bool channels_last = use_channels_last(grad_in);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor grad_out = grad_in.contiguous(format);
  const auto acc = acc_type(grad_out.scalar_type());
  const at::Tensor boxes = boxes_in.to(acc).contiguous();
  const at::Tensor box_index = box_index_in.contiguous();
  at::Tensor grad = at::empty({n, grad_out.size(1), height, width}, grad_out.options().dtype(acc).memory_format(format))
                        .zero_();
  C10_CUDA_CHECK(cuda::crop_resize_backward(to_kernel_dtype(grad_out.scalar_type()), channels_last,
                                            grad_out.const_data_ptr(), boxes.const_data_ptr(),
                                            box_index.const_data_ptr<int64_t>(), grad.mutable_data_ptr(), n,
                                            grad_out.size(1), height, width, grad_out.size(0), grad_out.size(2),
                                            grad_out.size(3), c10::cuda::getCurrentCUDAStream().stream()));
  return acc == grad_out.scalar_type() ? grad : grad.to(grad_out.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("crop_resize", &crop_resize_cuda);
  m.impl("crop_resize_backward", &crop_resize_backward_cuda);
}

}  // namespace mmfuse

#endif  // MMFUSE_WITH_CUDA
