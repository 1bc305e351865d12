// The ops' argument checks, in the words of the Python side (lifeiqa_fast/ops/_impl.py, check_like_x and
// the ops' _check): "lifeiqa_fast.<op>: <argument> must ...", shapes and dtypes printed as Python prints
// them. The C++ checks are the native ops' contract, which the Python side repeats for the paths without
// a kernel; tests/test_contract.py holds the two to the same messages. What only a kernel needs (a
// contiguous layout, a size limit) is checked here only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace lifeiqa_fast {

// A shape as Python prints a tuple: (2, 3), (4,), ().
inline std::string shape_text(at::IntArrayRef shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

// A dtype as Python prints it: torch.float32.
inline std::string dtype_text(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(type);
  }
}

// The size most of sizes agree on, the first of them on a tie; -1 (a tensor of the wrong rank) never wins:
// an inner size read from several tensors, so that a shape error names the one that disagrees.
inline int64_t agreed_size(std::initializer_list<int64_t> sizes) {
  int64_t best = -1, best_count = 0;
  for (int64_t s : sizes) {
    if (s < 0) continue;
    const auto count = std::count(sizes.begin(), sizes.end(), s);
    if (count > best_count) best = s, best_count = count;
  }
  return best;
}

// t's size along axis if it has dim dimensions, else -1.
inline int64_t size_if(const at::Tensor& t, int64_t dim, int64_t axis) {
  return t.dim() == dim ? t.size(axis) : -1;
}

inline void check_floating(const char* op, const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lifeiqa_fast.", op, ": x must be a floating tensor, got ",
              dtype_text(x.scalar_type()));
}

// name's tensor has shape expected ({symbols} = (...); -1 where a size is already wrong).
inline void check_shape(const char* op, const char* name, const at::Tensor& t, const char* symbols,
                        const std::vector<int64_t>& expected) {
  const bool known = std::find(expected.begin(), expected.end(), -1) == expected.end();
  TORCH_CHECK(known && t.sizes() == at::IntArrayRef(expected), "lifeiqa_fast.", op, ": ", name, " must have shape ",
              symbols, " = ", shape_text(expected), ", got ", shape_text(t.sizes()));
}

using NamedTensors = std::initializer_list<std::pair<const char*, const at::Tensor*>>;

inline void check_like_x(const char* op, const at::Tensor& x, NamedTensors tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "lifeiqa_fast.", op, ": ", name,
                " must have x's dtype and device (", dtype_text(x.scalar_type()), ", ", x.device().str(), "), got (",
                dtype_text(t->scalar_type()), ", ", t->device().str(), ")");
  }
}

// What the kernels need beyond the contract: a contiguous layout.
inline void check_contiguous(const char* op, NamedTensors tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->is_contiguous(), "lifeiqa_fast.", op, ": the kernels take a contiguous ", name);
  }
}

}  // namespace lifeiqa_fast
