"""Install mmsecvit: the SecViT backbone for mmdetection and mmsegmentation."""
import platform
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version():
    text = (HERE / 'mmsecvit' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


def kernel_extensions():
    """The CPU kernels (``mmsecvit/csrc``: cluster attention, ranking, depthwise convolution alone and after
    GELU), built against the installed torch on x86-64 Linux.

    It is optional: where torch is not importable at build time, or the build fails, mmsecvit runs the same
    computation with PyTorch operations.
    """
    if not (sys.platform.startswith('linux') and platform.machine() == 'x86_64'):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = sorted(str(path.relative_to(HERE)) for path in (HERE / 'mmsecvit' / 'csrc').glob('*.cpp'))
    kernel = CppExtension('mmsecvit._kernels', sources,
                          extra_compile_args=['-O3', '-fopenmp'], extra_link_args=['-fopenmp'], optional=True)
    return [kernel], {'build_ext': BuildExtension}


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
