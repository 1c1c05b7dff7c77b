"""Install mmsecvit: the SecViT backbone for mmdetection and mmsegmentation."""
import os
import platform
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version():
    text = (HERE / 'mmsecvit' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


# Compiler flags of the two builds of the same kernel sources (mmsecvit/ops/csrc/simd.h picks the vector
# width from them): one for CPUs with AVX-512, one for the other x86-64 CPUs with AVX2 and FMA.
KERNEL_ISA_FLAGS = {
    'avx512': ['-mavx512f', '-mavx512dq', '-mavx512bw', '-mavx512vl', '-mavx2', '-mfma'],
    'avx2': ['-mavx2', '-mfma'],
}


def kernel_extensions():
    """The CPU kernels (``mmsecvit/ops/csrc``: cluster attention, ranking, depthwise convolution alone and
    after GELU), built against the installed torch on x86-64 Linux, once per instruction set:
    ``mmsecvit.ops._kernels_avx512`` and ``mmsecvit.ops._kernels_avx2``, each reporting with ``supported()``
    whether this CPU runs it.

    Both are optional: where torch is not importable at build time, or a build fails, mmsecvit runs the same
    computation with PyTorch operations.
    """
    if not (sys.platform.startswith('linux') and platform.machine() == 'x86_64'):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}

    class BuildKernels(BuildExtension):
        """BuildExtension compiling every extension into its own temporary directory: the two builds compile
        the same source files, whose objects would overwrite or stand in for each other in one directory."""

        def finalize_options(self):
            super().finalize_options()
            self.parallel = None  # one extension at a time, as build_extension switches build_temp

        def build_extension(self, ext):
            shared_temp = self.build_temp
            self.build_temp = str(Path(shared_temp) / ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared_temp

    csrc = HERE / 'mmsecvit' / 'ops' / 'csrc'
    # MMSECVIT_SANITIZE=address builds the kernels with AddressSanitizer (tools/asan_check.sh).
    sanitizer = [f'-fsanitize={os.environ["MMSECVIT_SANITIZE"]}', '-fno-omit-frame-pointer'] if os.environ.get(
        'MMSECVIT_SANITIZE') else []
    sources = sorted(str(path.relative_to(HERE)) for path in csrc.glob('*.cpp'))
    headers = sorted(str(path.relative_to(HERE)) for path in csrc.glob('*.h'))
    kernels = [
        CppExtension(f'mmsecvit.ops._kernels_{isa}', sources, depends=headers,
                     extra_compile_args=['-O3', '-fopenmp', *flags, *sanitizer],
                     extra_link_args=['-fopenmp', *sanitizer], optional=True)
        for isa, flags in KERNEL_ISA_FLAGS.items()
    ]
    return kernels, {'build_ext': BuildKernels}


EXT_MODULES, CMDCLASS = kernel_extensions()

setup(
    name='mmsecvit',
    version=read_version(),
    description='SecViT (Semantic Equitable Clustering) backbones for mmdetection and mmsegmentation',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmsecvit', 'mmsecvit.*']),
    python_requires='>=3.9',
    install_requires=['torch>=2.0', 'mmengine>=0.10', 'mmcv>=2.0.0rc4,<2.2.0'],
    extras_require={'det': ['mmdet>=3.0'], 'seg': ['mmsegmentation>=1.0', 'ftfy', 'regex'], 'timm': ['timm>=0.9']},
    license='Apache-2.0',
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    zip_safe=False,
)
