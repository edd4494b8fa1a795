#pragma once
// FASTCV_HD marks arithmetic shared by the CPU and CUDA kernels: the CPU tests then exercise the GPU math.
#if defined(__CUDACC__)
#define FASTCV_HD __host__ __device__ __forceinline__
#else
#define FASTCV_HD inline
#endif
