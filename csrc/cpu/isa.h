// Run-time choice between a CPU kernel's 512-bit and 256-bit variants, shared by the kernels that
// carry both (attention, bias_gelu).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace nit { namespace cpu {

// true: run the 512-bit kernels. The environment variable `env_name` ("256" or "512") forces a
// width; unset, 512 where this build has those kernels (`built`) and the CPU runs them (`has`).
// `needs` names the CPU features for the error message.
inline bool choose_512_bits(const char* env_name, bool built, bool has, const char* needs) {
  const char* env = std::getenv(env_name);
  const std::string want = env ? env : "";
  TORCH_CHECK(want.empty() || want == "256" || want == "512", env_name, " must be 256 or 512, got '", want,
              "'");
  TORCH_CHECK(want != "512" || built, env_name, "=512: this build has no AVX-512 kernels");
  TORCH_CHECK(want != "512" || has, env_name, "=512 needs a CPU with ", needs, ", this one lacks them");
  return want.empty() ? built && has : want == "512";
}

} }  // namespace nit::cpu
