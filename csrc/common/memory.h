#pragma once
// Large outputs are fresh memory (torch.empty -> mmap): the first write to each 4 KB page faults, and
// for an output of tens of MB the faults cost more than the kernel itself (measured: im2col of
// [8,64,56,56] k3 writes 58 MB in 3.3 ms, while faulting it in takes ~15 ms). Asking for transparent
// huge pages before the first touch turns thousands of faults into a few dozen. A hint only: it is
// ignored where THP is off, and harmless on memory already touched.
#include <cstddef>
#include <memory>

namespace fastcv {

void advise_huge_pages(void* data, size_t bytes);

// Work memory of one call (padded input planes, relaid operands) that the calling thread keeps for its next
// calls. A fresh multi-megabyte std::vector per call pays its page faults, the kernel's zeroing of each
// page and then its own zero-fill every time (page zeroing alone was 6.5% of a ResNet-50 training step's
// CPU time here); a kept buffer only grows. Contents are uninitialised. `slot` (0 to 3) tells apart the
// buffers one call holds at once; the memory stays with the thread until it exits.
template <class T>
T* scratch(int slot, size_t count) {
  struct Buffer {
    std::unique_ptr<unsigned char[]> data;
    size_t bytes = 0;
  };
  thread_local Buffer buffers[4];
  Buffer& b = buffers[slot];
  if (b.bytes < count * sizeof(T)) {
    b.data.reset();  // free first: the old and new buffers need not both fit
    b.data.reset(new unsigned char[count * sizeof(T)]);
    b.bytes = count * sizeof(T);
  }
  return reinterpret_cast<T*>(b.data.get());
}

}  // namespace fastcv
