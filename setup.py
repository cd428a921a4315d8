"""Builds the optional extension mmfuse_fast._C from csrc/.

- csrc/*.cpp and csrc/cpu/*.cpp (operator schemas, CPU kernels) are always compiled.
- csrc/cuda/*.cu and csrc/cuda/*.cpp (CUDA kernels and their torch glue) are added when torch is a CUDA build and
  nvcc is found (CUDA_HOME); the arch list defaults to 8.0;9.0 (A100, H100), override with TORCH_CUDA_ARCH_LIST.
- MMFUSE_NO_EXTENSION=1 skips the extension: the package then uses its pure-PyTorch fallbacks.
- MMFUSE_NO_CUDA=1 builds the CPU kernels only, even with a CUDA torch.

Install with `pip install --no-build-isolation -e .` (this file imports torch).
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
if cpp_sources and os.environ.get("MMFUSE_NO_EXTENSION", "0") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_glue = sorted(glob.glob("csrc/cuda/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = (bool(cu_sources) and torch.version.cuda is not None and CUDA_HOME is not None
                and os.environ.get("MMFUSE_NO_CUDA", "0") != "1")
    here = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(here, "csrc")]
    # The C++ standard is the one torch asks for (C++20 with torch 2.13). -fopenmp: at::parallel_for is inlined
    # into this extension, and without OpenMP here it silently runs every loop on one thread.
    extra = {"cxx": ["-O3", "-fopenmp"]}
    link_args = ["-fopenmp"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3"]
        extension = CUDAExtension("mmfuse_fast._C", cpp_sources + cu_sources, include_dirs=include_dirs,
                                  extra_compile_args=extra, extra_link_args=link_args,
                                  define_macros=[("MMFUSE_WITH_CUDA", None)])
    else:
        cpu_sources = [s for s in cpp_sources if s not in cuda_glue]
        extension = CppExtension("mmfuse_fast._C", cpu_sources, include_dirs=include_dirs, extra_compile_args=extra,
                                 extra_link_args=link_args)
    ext_modules = [extension]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
