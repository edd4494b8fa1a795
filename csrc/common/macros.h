#pragma once
// FASTCV_HD marks arithmetic shared by the CPU and CUDA kernels: the CPU tests then exercise the GPU math.
#if defined(__CUDACC__)
#define FASTCV_HD __host__ __device__ __forceinline__
#else
#define FASTCV_HD inline
#endif

// Hot CPU loops are compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one at run time,
// so one wheel is fast on new CPUs and still runs on old ones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define FASTCV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCV_CPU_CLONES
#endif
