"""Suite-wide settings, applied before any test module imports torch extensions or triton."""

import os

import torch

# Without a GPU, Triton kernels run through the interpreter. This must be set before anything
# (transformers, accelerate, our kernels) imports triton, or its JIT is bound to the compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
