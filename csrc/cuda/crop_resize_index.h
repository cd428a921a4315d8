// Launch geometry and index width of the CUDA kernels of mmfuse::crop_resize. Plain C++ (no CUDA, no torch), so that
// tests/ops/test_crop_resize_index.py compiles it with the host compiler and checks the bound on machines without
// a GPU.
#pragma once

#include <cstdint>

namespace mmfuse {
namespace cuda {

constexpr int kThreads = 256;
// Grid-stride loops: the grid is capped; 2^20 blocks of 256 threads oversubscribe any current GPU.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

inline int64_t blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks;
}

// Whether 32-bit index arithmetic is exact for a launch over `work` items (one per grid-stride iteration) that
// reads `image_elems` and writes `out_elems` elements. Every offset is below one of the element counts, and the
// grid-stride counter goes up to (work - 1) + (threads in the grid): the increment after the last item must not
// overflow either, or the loop test reads a wrapped (negative) counter and runs again.
inline bool fits_int32(int64_t image_elems, int64_t out_elems, int64_t work) {
  const int64_t limit = int64_t{1} << 31;  // every value must stay <= INT32_MAX = limit - 1
  return image_elems < limit && out_elems < limit && work + blocks_for(work) * kThreads <= limit;
}

}  // namespace cuda
}  // namespace mmfuse
