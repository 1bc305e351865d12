# find_package(Torch) for this project, without libtorch's own CUDA search.
#
# With a CUDA build of torch (e.g. the pip wheel), find_package(Torch) includes Caffe2/public/cuda.cmake,
# which
#   - needs a CUDA toolkit (FindCUDA, nvcc on PATH) even for a CPU-only build, and fails without one
#     (/usr/local/cuda/bin is often not on PATH);
#   - auto-detects ~11 GPU architectures when TORCH_CUDA_ARCH_LIST is unset, and sets
#     CMAKE_CUDA_ARCHITECTURES OFF and CMAKE_CUDA_STANDARD 20 (which CMake 3.25 rejects for nvcc);
#   - leaves CUDA_nvrtc_LIBRARY-NOTFOUND in TORCH_LIBRARIES when the toolkit has no nvrtc (a pip
#     toolkit's cuBLAS/cuSPARSE/nvrtc/... live in site-packages/nvidia/*/lib, where libtorch_cuda.so's
#     $ORIGIN rpath finds them, at link time too).
# Torch's own targets need a single target from it, torch::cudart, and cuda.cmake returns at once when
# that target exists. So torch::cudart is defined here first: CUDA::cudart of nvcc's toolkit with
# WITH_CUDA=ON (find_package(CUDAToolkit) has run), an empty interface with WITH_CUDA=OFF (no CUDA
# toolkit needed then). Link torch's imported targets (torch_cpu_library, c10, c10_cuda,
# torch_cuda_library), never ${TORCH_LIBRARIES}.
if(NOT TARGET torch::cudart)
  add_library(torch::cudart INTERFACE IMPORTED)
  if(WITH_CUDA)
    set_property(TARGET torch::cudart PROPERTY INTERFACE_LINK_LIBRARIES CUDA::cudart)
  endif()
endif()

find_package(Torch REQUIRED)

# Torch's mkl.cmake adds ${MKL_ROOT}/lib/intel64 etc. as link directories even when MKL_ROOT is empty
# (the pip wheel links MKL statically): drop those /lib/intel64-style entries and their rpaths.
if(TARGET caffe2::mkl AND NOT MKL_ROOT)
  set_property(TARGET caffe2::mkl PROPERTY INTERFACE_LINK_DIRECTORIES "")
endif()

if(WITH_CUDA AND NOT TARGET c10_cuda)
  message(FATAL_ERROR "WITH_CUDA=ON but this torch (${TORCH_INSTALL_PREFIX}) was built without CUDA")
endif()
