// CPU kernels of mmfuse::crop_resize and mmfuse::crop_resize_backward.
//
// Sample positions and weights depend only on (box, output row) and (box, output column), so they are computed
// once per box into small tables and reused for every channel. NCHW inputs are resampled separably (horizontal
// pass on the few source rows a box needs, then a vertical blend that vectorizes over the output row);
// channels_last inputs blend whole pixels, vectorizing over the channels. Both compute
//   top = a + fx (b - a),  bottom = c + fx (d - c),  out = top + fy (bottom - top)
// in fp32 (fp64 for double inputs), so the two layouts give bitwise-identical results.
// The backward is deterministic: every image plane (NCHW) or image (channels_last) is owned by one task, which
// gathers the gradients of its boxes in box order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "crop_resize_common.h"

namespace mmfuse {
namespace {

// One source row resampled horizontally: dst[j] = a + f (b - a) with a = src[lo[j]], b = src[hi[j]].
template <typename scalar_t, typename acc_t>
inline void resample_row(const scalar_t* src, const int32_t* lo, const int32_t* hi, const acc_t* frac, acc_t* dst,
                         int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    const acc_t a = static_cast<acc_t>(src[lo[j]]);
    const acc_t b = static_cast<acc_t>(src[hi[j]]);
    dst[j] = a + frac[j] * (b - a);
  }
}

// Per-box sample tables along one axis: source index below and above the sample point and the fraction.
template <typename acc_t>
struct AxisTable {
  std::vector<int32_t> lo, hi;
  std::vector<acc_t> frac;
  void resize(int64_t n) {
    lo.resize(n);
    hi.resize(n);
    frac.resize(n);
  }
};

// x = start + (j + 0.5) * (end - start) / out - 0.5, clamped to [0, size - 1]; the same expression, evaluated in the
// same order, as the reference (ops/reference.py) and the CUDA kernel.
template <typename acc_t>
void fill_axis(acc_t start, acc_t end, int64_t out, int64_t size, int32_t* lo, int32_t* hi, acc_t* frac) {
  const acc_t bin = (end - start) / static_cast<acc_t>(out);
  const acc_t top = static_cast<acc_t>(size - 1);
  for (int64_t j = 0; j < out; ++j) {
    acc_t x = start + (static_cast<acc_t>(j) + acc_t(0.5)) * bin - acc_t(0.5);
    x = std::min(std::max(x, acc_t(0)), top);
    const int64_t x0 = static_cast<int64_t>(x);  // x >= 0: truncation is floor
    lo[j] = static_cast<int32_t>(x0);
    hi[j] = static_cast<int32_t>(std::min<int64_t>(x0 + 1, size - 1));
    frac[j] = x - static_cast<acc_t>(x0);
  }
}

// Boxes must lie inside the image (up to a small tolerance) with x2 > x1 and y2 > y1; box_index in [0, n).
// On the CPU this costs O(K), so the kernel checks even when called directly through torch.ops.
template <typename acc_t>
void check_box_values(const acc_t* b, const int64_t* box_index, int64_t k_boxes, int64_t n, int64_t height,
                      int64_t width, const char* op) {
  const double eps = 1e-4;
  for (int64_t k = 0; k < k_boxes; ++k) {
    const double x1 = b[4 * k], y1 = b[4 * k + 1], x2 = b[4 * k + 2], y2 = b[4 * k + 3];
    const bool ok = std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2) && x2 > x1 &&
                    y2 > y1 && x1 >= -eps && y1 >= -eps && x2 <= width + eps && y2 <= height + eps;
    TORCH_CHECK_VALUE(ok, op, ": box ", k, " = (", x1, ", ", y1, ", ", x2, ", ", y2, ") is not inside the ", width,
                      "x", height, " image with x2 > x1 and y2 > y1");
    TORCH_CHECK_INDEX(box_index[k] >= 0 && box_index[k] < n, op, ": box_index[", k, "] = ", box_index[k],
                      " is out of range for ", n, " images");
  }
}

template <typename acc_t>
struct Tables {
  AxisTable<acc_t> x, y;  // (K * out_w), (K * out_h)
};

template <typename acc_t>
Tables<acc_t> make_tables(const acc_t* b, int64_t k_boxes, int64_t out_h, int64_t out_w, int64_t height,
                          int64_t width) {
  Tables<acc_t> t;
  t.x.resize(k_boxes * out_w);
  t.y.resize(k_boxes * out_h);
  at::parallel_for(0, k_boxes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* bk = b + 4 * k;
      fill_axis<acc_t>(bk[0], bk[2], out_w, width, &t.x.lo[k * out_w], &t.x.hi[k * out_w], &t.x.frac[k * out_w]);
      fill_axis<acc_t>(bk[1], bk[3], out_h, height, &t.y.lo[k * out_h], &t.y.hi[k * out_h], &t.y.frac[k * out_h]);
    }
  });
  return t;
}

template <typename scalar_t, typename acc_t>
void forward_nchw(const scalar_t* img, const Tables<acc_t>& t, const int64_t* box_index, scalar_t* out, int64_t C,
                  int64_t H, int64_t W, int64_t K, int64_t h, int64_t w) {
  const int64_t grain = std::max<int64_t>(1, 32768 / (h * w));
  at::parallel_for(0, K * C, grain, [&](int64_t begin, int64_t end) {
    // Two horizontally resampled source rows, tagged by their source row index.
    std::vector<acc_t> buffer(2 * w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / C, c = task % C;
      const scalar_t* plane = img + (box_index[k] * C + c) * H * W;
      const int32_t* xl = &t.x.lo[k * w];
      const int32_t* xh = &t.x.hi[k * w];
      const acc_t* xf = &t.x.frac[k * w];
      acc_t* rows[2] = {buffer.data(), buffer.data() + w};
      int64_t tag[2] = {-1, -1};
      // Returns source row y resampled horizontally, keeping the cached row `keep`.
      auto row = [&](int64_t y, int64_t keep) -> const acc_t* {
        if (tag[0] == y) return rows[0];
        if (tag[1] == y) return rows[1];
        const int slot = tag[0] == keep ? 1 : 0;
        acc_t* dst = rows[slot];
        resample_row<scalar_t, acc_t>(plane + y * W, xl, xh, xf, dst, w);
        tag[slot] = y;
        return dst;
      };
      scalar_t* o = out + task * h * w;
      for (int64_t i = 0; i < h; ++i) {
        const int64_t y0 = t.y.lo[k * h + i], y1 = t.y.hi[k * h + i];
        const acc_t fy = t.y.frac[k * h + i];
        const acc_t* r0 = row(y0, y1);
        const acc_t* r1 = row(y1, y0);
        scalar_t* oi = o + i * w;
        for (int64_t j = 0; j < w; ++j) {
          oi[j] = static_cast<scalar_t>(r0[j] + fy * (r1[j] - r0[j]));
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_channels_last(const scalar_t* img, const Tables<acc_t>& t, const int64_t* box_index, scalar_t* out,
                           int64_t C, int64_t H, int64_t W, int64_t K, int64_t h, int64_t w) {
  const int64_t grain = std::max<int64_t>(1, 32768 / (w * C));
  at::parallel_for(0, K * h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / h, i = task % h;
      const scalar_t* image = img + box_index[k] * H * W * C;
      const scalar_t* row0 = image + t.y.lo[k * h + i] * W * C;
      const scalar_t* row1 = image + t.y.hi[k * h + i] * W * C;
      const acc_t fy = t.y.frac[k * h + i];
      scalar_t* o = out + task * w * C;
      for (int64_t j = 0; j < w; ++j) {
        const int64_t x0 = t.x.lo[k * w + j] * C, x1 = t.x.hi[k * w + j] * C;
        const acc_t fx = t.x.frac[k * w + j];
        const scalar_t *pa = row0 + x0, *pb = row0 + x1, *pc = row1 + x0, *pd = row1 + x1;
        scalar_t* oj = o + j * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t a = static_cast<acc_t>(pa[c]), b = static_cast<acc_t>(pb[c]);
          const acc_t cc = static_cast<acc_t>(pc[c]), d = static_cast<acc_t>(pd[c]);
          const acc_t top = a + fx * (b - a);
          const acc_t bottom = cc + fx * (d - cc);
          oj[c] = static_cast<scalar_t>(top + fy * (bottom - top));
        }
      }
    }
  });
}

// Boxes of each image in box order (CSR), so that each backward task gathers its boxes in a fixed order.
struct BoxesByImage {
  std::vector<int64_t> offsets, order;
};

BoxesByImage group_boxes(const int64_t* box_index, int64_t K, int64_t n) {
  BoxesByImage g;
  g.offsets.assign(n + 1, 0);
  for (int64_t k = 0; k < K; ++k) g.offsets[box_index[k] + 1]++;
  for (int64_t i = 0; i < n; ++i) g.offsets[i + 1] += g.offsets[i];
  g.order.resize(K);
  std::vector<int64_t> fill(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t k = 0; k < K; ++k) g.order[fill[box_index[k]]++] = k;
  return g;
}

template <typename scalar_t, typename acc_t>
void backward_nchw(const scalar_t* gout, const Tables<acc_t>& t, const BoxesByImage& groups, acc_t* gin, int64_t n,
                   int64_t C, int64_t H, int64_t W, int64_t h, int64_t w) {
  at::parallel_for(0, n * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmp(H * w);  // vertically scattered gradient rows, before the horizontal scatter
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / C, c = task % C;
      acc_t* g = gin + task * H * W;
      for (int64_t p = groups.offsets[img]; p < groups.offsets[img + 1]; ++p) {
        const int64_t k = groups.order[p];
        const scalar_t* go = gout + (k * C + c) * h * w;
        const int64_t ylo = t.y.lo[k * h], yhi = t.y.hi[k * h + h - 1];
        std::fill(tmp.begin() + ylo * w, tmp.begin() + (yhi + 1) * w, acc_t(0));
        for (int64_t i = 0; i < h; ++i) {
          const acc_t fy = t.y.frac[k * h + i], gy = acc_t(1) - fy;
          acc_t* t0 = tmp.data() + t.y.lo[k * h + i] * w;
          acc_t* t1 = tmp.data() + t.y.hi[k * h + i] * w;
          const scalar_t* gi = go + i * w;
          for (int64_t j = 0; j < w; ++j) t0[j] += gy * static_cast<acc_t>(gi[j]);
          for (int64_t j = 0; j < w; ++j) t1[j] += fy * static_cast<acc_t>(gi[j]);
        }
        const int32_t* xl = &t.x.lo[k * w];
        const int32_t* xh = &t.x.hi[k * w];
        const acc_t* xf = &t.x.frac[k * w];
        for (int64_t y = ylo; y <= yhi; ++y) {
          const acc_t* ty = tmp.data() + y * w;
          acc_t* gy = g + y * W;
          for (int64_t j = 0; j < w; ++j) {
            const acc_t v = ty[j];
            gy[xl[j]] += v - xf[j] * v;
            gy[xh[j]] += xf[j] * v;
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_channels_last(const scalar_t* gout, const Tables<acc_t>& t, const BoxesByImage& groups, acc_t* gin,
                            int64_t n, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t img = begin; img < end; ++img) {
      acc_t* g = gin + img * H * W * C;
      for (int64_t p = groups.offsets[img]; p < groups.offsets[img + 1]; ++p) {
        const int64_t k = groups.order[p];
        for (int64_t i = 0; i < h; ++i) {
          const acc_t fy = t.y.frac[k * h + i];
          acc_t* row0 = g + t.y.lo[k * h + i] * W * C;
          acc_t* row1 = g + t.y.hi[k * h + i] * W * C;
          const scalar_t* gi = gout + (k * h + i) * w * C;
          for (int64_t j = 0; j < w; ++j) {
            const acc_t fx = t.x.frac[k * w + j];
            const acc_t wa = (acc_t(1) - fy) * (acc_t(1) - fx), wb = (acc_t(1) - fy) * fx;
            const acc_t wc = fy * (acc_t(1) - fx), wd = fy * fx;
            const int64_t x0 = t.x.lo[k * w + j] * C, x1 = t.x.hi[k * w + j] * C;
            const scalar_t* gj = gi + j * C;
            acc_t *pa = row0 + x0, *pb = row0 + x1, *pc = row1 + x0, *pd = row1 + x1;
            for (int64_t c = 0; c < C; ++c) pa[c] += wa * static_cast<acc_t>(gj[c]);
            for (int64_t c = 0; c < C; ++c) pb[c] += wb * static_cast<acc_t>(gj[c]);
            for (int64_t c = 0; c < C; ++c) pc[c] += wc * static_cast<acc_t>(gj[c]);
            for (int64_t c = 0; c < C; ++c) pd[c] += wd * static_cast<acc_t>(gj[c]);
          }
        }
      }
    }
  });
}

at::Tensor crop_resize_cpu(const at::Tensor& images_in, const at::Tensor& boxes_in, const at::Tensor& box_index_in,
                           int64_t out_h, int64_t out_w) {
  check_forward_args(images_in, boxes_in, box_index_in, out_h, out_w);
  TORCH_CHECK(images_in.device().is_cpu(), "crop_resize_cpu: expected CPU tensors");
  const bool channels_last = use_channels_last(images_in);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor images = images_in.contiguous(format);
  const at::Tensor box_index = box_index_in.contiguous();
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t K = boxes_in.size(0);
  at::Tensor out = at::empty({K, C, out_h, out_w}, images.options().memory_format(format));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "crop_resize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor boxes = boxes_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* b = boxes.const_data_ptr<acc_t>();
    const int64_t* bi = box_index.const_data_ptr<int64_t>();
    check_box_values<acc_t>(b, bi, K, N, H, W, "crop_resize");
    if (K == 0 || C == 0) return;
    const Tables<acc_t> tables = make_tables<acc_t>(b, K, out_h, out_w, H, W);
    if (channels_last) {
      forward_channels_last<scalar_t, acc_t>(images.const_data_ptr<scalar_t>(), tables, bi,
                                             out.mutable_data_ptr<scalar_t>(), C, H, W, K, out_h, out_w);
    } else {
      forward_nchw<scalar_t, acc_t>(images.const_data_ptr<scalar_t>(), tables, bi, out.mutable_data_ptr<scalar_t>(),
                                    C, H, W, K, out_h, out_w);
    }
  });
  return out;
}

at::Tensor crop_resize_backward_cpu(const at::Tensor& grad_in, const at::Tensor& boxes_in,
                                    const at::Tensor& box_index_in, int64_t n, int64_t height, int64_t width) {
  check_backward_args(grad_in, boxes_in, box_index_in, n, height, width);
  TORCH_CHECK(grad_in.device().is_cpu(), "crop_resize_backward_cpu: expected CPU tensors");
  const bool channels_last = use_channels_last(grad_in);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor grad_out = grad_in.contiguous(format);
  const at::Tensor box_index = box_index_in.contiguous();
  const int64_t K = grad_out.size(0), C = grad_out.size(1), h = grad_out.size(2), w = grad_out.size(3);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "crop_resize_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor boxes = boxes_in.to(acc_type).contiguous();
    const acc_t* b = boxes.const_data_ptr<acc_t>();
    const int64_t* bi = box_index.const_data_ptr<int64_t>();
    check_box_values<acc_t>(b, bi, K, n, height, width, "crop_resize_backward");
    // fp32 (fp64) accumulation buffer; it is the result for float and double gradients.
    at::Tensor acc = at::empty({n, C, height, width}, grad_out.options().dtype(acc_type).memory_format(format)).zero_();
    if (K > 0 && C > 0 && n > 0) {
      const Tables<acc_t> tables = make_tables<acc_t>(b, K, h, w, height, width);
      const BoxesByImage groups = group_boxes(bi, K, n);
      if (channels_last) {
        backward_channels_last<scalar_t, acc_t>(grad_out.const_data_ptr<scalar_t>(), tables, groups,
                                                acc.mutable_data_ptr<acc_t>(), n, C, height, width, h, w);
      } else {
        backward_nchw<scalar_t, acc_t>(grad_out.const_data_ptr<scalar_t>(), tables, groups,
                                       acc.mutable_data_ptr<acc_t>(), n, C, height, width, h, w);
      }
    }
    result = acc_type == grad_out.scalar_type() ? acc : acc.to(grad_out.scalar_type());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CPU, m) {
  m.impl("crop_resize", &crop_resize_cpu);
  m.impl("crop_resize_backward", &crop_resize_backward_cpu);
}

}  // namespace mmfuse
