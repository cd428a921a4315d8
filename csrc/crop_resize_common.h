// Argument checks and layout rule shared by the CPU and CUDA implementations of mmfuse::crop_resize.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mmfuse {

inline bool is_supported_image_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The output follows the input's layout: channels_last only when the input is channels_last and not also
// NCHW-contiguous (the Python fake kernel applies the same rule, so fake and real strides agree).
inline bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_boxes(const at::Tensor& ref, const at::Tensor& boxes, const at::Tensor& box_index, const char* op) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must be (K, 4); got ", boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": boxes must be floating point; got ",
              boxes.scalar_type());
  TORCH_CHECK(box_index.scalar_type() == at::kLong && box_index.dim() == 1 && box_index.size(0) == boxes.size(0),
              op, ": box_index must be int64 (K,) with K = ", boxes.size(0), "; got ", box_index.scalar_type(), " ",
              box_index.sizes());
  TORCH_CHECK(boxes.device() == ref.device() && box_index.device() == ref.device(), op,
              ": all tensors must be on one device; got ", ref.device(), ", ", boxes.device(), ", ",
              box_index.device());
}

inline void check_forward_args(const at::Tensor& images, const at::Tensor& boxes, const at::Tensor& box_index,
                               int64_t out_h, int64_t out_w) {
  TORCH_CHECK(images.dim() == 4, "crop_resize: images must be (N, C, H, W); got ", images.sizes());
  TORCH_CHECK(is_supported_image_dtype(images.scalar_type()),
              "crop_resize: images must be float32/float64/float16/bfloat16; got ", images.scalar_type());
  TORCH_CHECK(images.size(2) >= 1 && images.size(3) >= 1, "crop_resize: empty image ", images.sizes());
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "crop_resize: output size must be >= 1; got ", out_h, "x", out_w);
  check_boxes(images, boxes, box_index, "crop_resize");
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& boxes, const at::Tensor& box_index,
                                int64_t n, int64_t height, int64_t width) {
  TORCH_CHECK(grad_out.dim() == 4, "crop_resize_backward: grad_out must be (K, C, h, w); got ", grad_out.sizes());
  TORCH_CHECK(is_supported_image_dtype(grad_out.scalar_type()),
              "crop_resize_backward: grad_out must be float32/float64/float16/bfloat16; got ",
              grad_out.scalar_type());
  TORCH_CHECK(n >= 0 && height >= 1 && width >= 1, "crop_resize_backward: bad image shape ", n, "x", height, "x",
              width);
  check_boxes(grad_out, boxes, box_index, "crop_resize_backward");
  TORCH_CHECK(grad_out.size(0) == boxes.size(0), "crop_resize_backward: grad_out has ", grad_out.size(0),
              " boxes, boxes has ", boxes.size(0));
}

}  // namespace mmfuse
