"""mmsecvit's compiled CPU kernels (``mmsecvit/csrc``, float32, AVX-512), when they are built.

``setup.py`` builds them as ``mmsecvit._kernels`` where a compiler and torch are present; without them
every caller uses its PyTorch implementation instead.
"""
try:
    from mmsecvit import _kernels
except ImportError:
    _kernels = None


def kernel_available():
    """Whether the compiled kernels are built and this CPU can run them (AVX-512)."""
    return _kernels is not None and _kernels.supported()
