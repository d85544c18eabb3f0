// Frozen TorchScript modules for inference: the two libtorch C++ calls that tch does
// not expose, `torch::jit::freeze` and `torch::jit::optimize_for_inference` (what
// Python's `torch.jit.freeze` / `torch.jit.optimize_for_inference` run), plus a
// forward. Compiled by core/build.rs against the same libtorch headers tch uses;
// tensors cross as tch's own `torch::Tensor*` handles. Rust side: core/src/frozen.rs.
#include <ATen/autocast_mode.h>
#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {
char* copy_message(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

// The useful line of a libtorch message: the first (the rest is a C++ backtrace),
// but for an error raised inside TorchScript code, whose first line only says so and
// whose last line is the reason ("RuntimeError: mat1 and mat2 shapes cannot be ...").
std::string summary(const std::string& s) {
  std::vector<std::string> lines;
  size_t at = 0;
  while (at <= s.size()) {
    size_t nl = s.find('\n', at);
    if (nl == std::string::npos) nl = s.size();
    std::string line = s.substr(at, nl - at);
    if (line.find_first_not_of(" \t\r") != std::string::npos) lines.push_back(line);
    at = nl + 1;
  }
  if (lines.empty()) return "unknown libtorch error";
  if (lines.size() > 1 && lines[0].rfind("The following operation failed", 0) == 0) {
    return lines.back();
  }
  return lines[0];
}

std::string message_of(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) {
    return summary(c->what_without_backtrace());
  }
  return summary(e.what());
}
}  // namespace

extern "C" {

// Loads `path` on `device` (-1: the CPU, k >= 0: CUDA device k) in eval mode; `level`
// 1 freezes it (weights become constants, conv + batch-norm fold), 2 also runs
// optimize_for_inference (and, on the CPU, MKL-DNN layouts where they pay). Returns
// null with `*err` set (free it with defuse_free_message) on failure.
void* defuse_frozen_load(const char* path, int device, int level, char** err) {
  try {
    c10::Device dev = device < 0 ? c10::Device(c10::kCPU)
                                 : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device));
    torch::jit::Module m = torch::jit::load(path, dev);
    m.eval();
    if (level >= 1) {
      m = torch::jit::freeze(m);
    }
    if (level >= 2) {
      m = torch::jit::optimize_for_inference(m);
    }
    return new torch::jit::Module(std::move(m));
  } catch (const std::exception& e) {
    *err = copy_message(message_of(e));
    return nullptr;
  } catch (...) {
    *err = copy_message("unknown C++ exception");
    return nullptr;
  }
}

// `forward(input)`: writes the output tensor, or the tensors of an output tuple, to
// `out` (at most `max_out`) and returns how many; -1 with `*err` set on failure.
int defuse_frozen_forward(void* module, void* input, void** out, int max_out, char** err) {
  try {
    auto* m = static_cast<torch::jit::Module*>(module);
    const auto& x = *static_cast<torch::Tensor*>(input);
    c10::IValue r = m->forward({x});
    if (r.isTensor()) {
      if (max_out < 1) throw std::runtime_error("no room for the output");
      out[0] = new torch::Tensor(r.toTensor());
      return 1;
    }
    if (r.isTuple()) {
      const auto& elems = r.toTupleRef().elements();
      if (static_cast<int>(elems.size()) > max_out) {
        throw std::runtime_error("it returns a tuple of " + std::to_string(elems.size()) +
                                 " values, expected at most " + std::to_string(max_out));
      }
      for (const auto& e : elems) {
        if (!e.isTensor()) throw std::runtime_error("it returns a tuple holding a non-tensor");
      }
      int n = 0;
      for (const auto& e : elems) out[n++] = new torch::Tensor(e.toTensor());
      return n;
    }
    throw std::runtime_error(std::string("it returns ") + r.tagKind() +
                             ", expected a tensor or a tuple of tensors");
  } catch (const std::exception& e) {
    *err = copy_message(message_of(e));
    return -1;
  } catch (...) {
    *err = copy_message("unknown C++ exception");
    return -1;
  }
}

// Autocast on this thread for `device` (0: the CPU, 1: CUDA): `dtype` 0 bfloat16,
// 1 float16, -1 off. Returns the previous state (-1 off, else the dtype code) so the
// caller can restore it.
int defuse_autocast_set(int device, int dtype) noexcept {
  // (these calls only set thread-local flags; noexcept: nothing crosses into Rust)
  const auto dev = device == 1 ? at::kCUDA : at::kCPU;
  int before = -1;
  if (at::autocast::is_autocast_enabled(dev)) {
    before = at::autocast::get_autocast_dtype(dev) == at::kHalf ? 1 : 0;
  }
  if (dtype < 0) {
    at::autocast::set_autocast_enabled(dev, false);
    at::autocast::clear_cache();
  } else {
    at::autocast::set_autocast_dtype(dev, dtype == 1 ? at::kHalf : at::kBFloat16);
    at::autocast::set_autocast_enabled(dev, true);
  }
  return before;
}

void defuse_frozen_free(void* module) { delete static_cast<torch::jit::Module*>(module); }

void defuse_free_message(char* s) { std::free(s); }
}
