"""The index-width rule of the CUDA crop_resize kernels (csrc/cuda/crop_resize_index.h), compiled with the host C++
compiler: no GPU needed. 32-bit indexing is chosen only when the grid-stride loop counter cannot overflow either:
it reaches (work - 1) + (threads in the grid) before the loop test ends the loop."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
INT32_MAX = 2**31 - 1
THREADS, MAX_BLOCKS = 256, 2**20

PROGRAM = r"""
#include <cstdio>
#include "cuda/crop_resize_index.h"
int main() {
  long long image, out, work;
  while (std::scanf("%lld %lld %lld", &image, &out, &work) == 3)
    std::printf("%d %lld\n", mmfuse::cuda::fits_int32(image, out, work) ? 1 : 0,
                static_cast<long long>(mmfuse::cuda::blocks_for(work)));
  return 0;
}
"""


def _largest_counter(work: int) -> int:
    """The largest value a thread's counter takes: its last item plus one grid stride."""
    blocks = min(max(-(-work // THREADS), 1), MAX_BLOCKS)
    return work - 1 + blocks * THREADS


@pytest.fixture(scope="module")
def rule(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp("index")
    (folder / "main.cpp").write_text(PROGRAM)
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{CSRC}", str(folder / "main.cpp"), "-o", str(folder / "rule")],
                   check=True, capture_output=True, text=True)

    def run(cases):
        text = "".join(f"{image} {out} {work}\n" for image, out, work in cases)
        lines = subprocess.run([str(folder / "rule")], input=text, capture_output=True, text=True,
                               check=True).stdout.split()
        return [(bool(int(lines[2 * i])), int(lines[2 * i + 1])) for i in range(len(cases))]

    return run


def test_int32_only_when_the_loop_counter_fits(rule):
    stride = MAX_BLOCKS * THREADS  # large launches run the capped grid
    cases = [
        (10**6, 10**6, 10**6),  # the model's crops: small
        (2**31 - 1, 2**31 - 1, 1000),  # offsets at the limit, a small loop
        (1000, 2**31 - 1000, 2**31 - 1000),  # below the old bound (every offset < 2^31) but the counter wraps
        (1000, 2**31 - stride, 2**31 - stride),  # counter ends exactly at INT32_MAX: still 32-bit
        (1000, 2**31 - stride + 1, 2**31 - stride + 1),  # one more item: 64-bit
        (2**31, 10, 10),  # an image with 2^31 elements
        (10, 2**31 - 1, 2**31 // 3),  # NCHW: fewer loop items than output elements
    ]
    results = rule(cases)
    for (image, out, work), (fits, blocks) in zip(cases, results):
        assert blocks == min(max(-(-work // THREADS), 1), MAX_BLOCKS)
        exact = image <= INT32_MAX and out <= INT32_MAX and _largest_counter(work) <= INT32_MAX
        assert fits == exact, (image, out, work, fits)
    assert [fits for fits, _ in results] == [True, True, False, True, False, False, True]
