#pragma once
// Large outputs are fresh memory (torch.empty -> mmap): the first write to each 4 KB page faults, and
// for an output of tens of MB the faults cost more than the kernel itself (measured: im2col of
// [8,64,56,56] k3 writes 58 MB in 3.3 ms, while faulting it in takes ~15 ms). Asking for transparent
// huge pages before the first touch turns thousands of faults into a few dozen. A hint only: it is
// ignored where THP is off, and harmless on memory already touched.
#include <cstddef>

namespace fastcv {

void advise_huge_pages(void* data, size_t bytes);

}  // namespace fastcv
