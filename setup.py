"""Builds the optional extension mmfuse_fast._C from csrc/ when its sources exist.

The CPU kernels are always compiled; the CUDA kernels are added when torch is a CUDA build and nvcc is found.
Without csrc/ sources (or without a compiler) the package still installs and uses its PyTorch fallbacks.
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
if cpp_sources and os.environ.get("MMFUSE_NO_EXTENSION", "0") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = bool(cu_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    extra = {"cxx": ["-O3", "-std=c++17"]}
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "-std=c++17"]
        extension = CUDAExtension("mmfuse_fast._C", cpp_sources + cu_sources, extra_compile_args=extra,
                                  define_macros=[("MMFUSE_WITH_CUDA", None)])
    else:
        extension = CppExtension("mmfuse_fast._C", cpp_sources, extra_compile_args=extra)
    ext_modules = [extension]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
