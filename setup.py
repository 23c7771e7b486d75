"""Builds ``sparsekern._C``: the C++ CPU kernels, plus the CUDA kernels when torch is a CUDA
build and ``CUDA_HOME`` is set. Never queries a GPU (build hosts have none)."""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - torch must be installed first (--no-build-isolation)
    torch = None
    print("sparsekern: torch is not importable at build time; building without sparsekern._C "
          "(install torch first and use `pip install --no-build-isolation`)")

if torch is not None and os.environ.get("SPARSEKERN_NO_EXT") != "1":
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG"]
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None
    if not with_cuda:
        print("sparsekern: CPU-only build of sparsekern._C "
              f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    if sources:
        if with_cuda:
            sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
            ext = CUDAExtension("sparsekern._C", sources, extra_compile_args={
                "cxx": cxx, "nvcc": ["-O3", "-std=c++17"]}, extra_link_args=["-fopenmp"])
        else:
            ext = CppExtension("sparsekern._C", sources, extra_compile_args=cxx,
                               extra_link_args=["-fopenmp"])
        ext_modules = [ext]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
