"""Suite-wide settings, applied before any test module imports torch extensions or triton.

Device tests: a test that takes a ``device`` argument runs once per entry of :data:`DEVICES`
("cpu" always, "cuda" too when a GPU is present), so the same tests check the kernels and the
layer on a GPU (``benchmarks/gpu_check.py`` runs them there). A module may narrow the list with
its own ``DEVICES`` tuple (the Triton tests: one process runs Triton either compiled for the GPU
or through the interpreter on CPU, never both).
"""

import os

import torch

# Without a GPU, Triton kernels run through the interpreter. This must be set before anything
# (transformers, accelerate, our kernels) imports triton, or its JIT is bound to the compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: devices a ``device`` test runs on
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

# Property tests must not fail because the shared 2-core machine is busy: no per-example
# deadline (speed is measured in benchmarks/, never in tests), and a derandomised run so CI
# draws the same examples every time.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("relibra", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("relibra")


def pytest_generate_tests(metafunc):
    """Parametrize every test with a ``device`` argument over the module's ``DEVICES`` (or the suite's).

    A parametrization, not a fixture: hypothesis's ``@given`` tests take it without a health check.
    """
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", getattr(metafunc.module, "DEVICES", DEVICES))
