"""Builds lifeiqa_fast._C: the C++ sources in csrc/ always, the CUDA sources in kernels/ when nvcc exists.

Environment switches:
  FORCE_CUDA=1            compile the CUDA sources even where nvcc is not found on the usual paths
  LIFEIQA_FAST_NO_CUDA=1  skip the CUDA sources
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (ninja)
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda, else found from nvcc on PATH)
ccache is used for both compilers when it is installed and CXX/PYTORCH_NVCC are not set.
"""
import glob
import hashlib
import json
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ["CUDA_PATH"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ.setdefault("CUDA_HOME", cuda_home)  # read by torch.utils.cpp_extension at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
if shutil.which("ccache") and "CXX" not in os.environ and os.path.isdir("/usr/lib/ccache"):
    os.environ["PATH"] = "/usr/lib/ccache" + os.pathsep + os.environ["PATH"]  # ccache's c++ wrapper
    if cuda_home:
        os.environ.setdefault("PYTORCH_NVCC", f"ccache {os.path.join(cuda_home, 'bin', 'nvcc')}")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = os.environ.get("LIFEIQA_FAST_NO_CUDA", "0") != "1" and (
    os.environ.get("FORCE_CUDA", "0") == "1"
    or bool(cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
)

cpp_sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("kernels/*.cu")) if with_cuda else []


def _kernel_source_hashes():
    """sha256 per op of its CUDA source, its headers and the kernels' shared header: what a GPU
    validation record names."""
    hashes = {}
    for cu in sorted(glob.glob("kernels/*.cu")):
        op = os.path.splitext(os.path.basename(cu))[0]
        h = hashlib.sha256()
        for path in [cu, *sorted(glob.glob(f"kernels/{op}.cuh")), *sorted(glob.glob(f"csrc/{op}.h")),
                     "kernels/common.cuh"]:
            with open(path, "rb") as f:
                h.update(f.read())
        hashes[op] = h.hexdigest()
    return hashes



def _write_build_info_header():
    """build/generated/lifeiqa_fast_build_info.h: the kernel source hashes and architectures as a string
    constant compiled into _C (csrc/library.cpp, op build_info), so that what a GPU validation record
    names is what the loaded binary holds: a failed rebuild leaves the old _C with its own record.
    Rewritten only when it changes (a new mtime would recompile library.cpp)."""
    info = json.dumps({"cuda": with_cuda,
                       "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
                       "cuda_sources": _kernel_source_hashes() if with_cuda else {}}, sort_keys=True)
    text = ("// Written by setup.py: what this build of _C was compiled from. Not to be edited.\n"
            f'#define LIFEIQA_FAST_BUILD_INFO R"json({info})json"\n')
    folder = os.path.join(HERE, "build", "generated")
    path = os.path.join(folder, "lifeiqa_fast_build_info.h")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return folder


generated_include = _write_build_info_header()

# -fopenmp: at::parallel_for, compiled into _C, is parallel only when built with OpenMP (torch's own
# libgomp serves it at run time).
extra_compile_args = {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3", "--use_fast_math"]}
Extension = CUDAExtension if with_cuda else CppExtension
ext = Extension(
    "lifeiqa_fast._C",
    cpp_sources + cuda_sources,
    include_dirs=[os.path.join(HERE, "csrc"), generated_include],
    extra_compile_args=extra_compile_args if with_cuda else {"cxx": extra_compile_args["cxx"]},
    extra_link_args=["-fopenmp"],
    py_limited_api=True,
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
