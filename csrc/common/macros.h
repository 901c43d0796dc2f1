// Portability macros for math shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define NIT_HD __host__ __device__ __forceinline__
#else
#define NIT_HD inline
#endif
