import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter: that is how CI tests
# their logic. It must be set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
