// CPU-side controls.  Which instruction set the CPU kernels use: the best this CPU has, unless SOFTMAX_CE_CPU_ISA or
// set_cpu_isa() picks another (tests run every path this CPU can).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace softmax_ce {

std::string cpu_isa();                 // "avx512", "avx2" or "generic"
std::vector<std::string> cpu_isas();   // those this CPU can run, best first
std::string set_cpu_isa(const std::string& name);  // returns the previous one; throws for an unusable one
void empty_grad_cache();  // free the CPU gradient blocks kept for reuse
std::vector<int64_t> grad_cache_sizes();  // the kept blocks' bytes, oldest first (for tests)

}  // namespace softmax_ce
