"""Install mmsecvit: the SecViT backbone for mmdetection and mmsegmentation."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version():
    text = (HERE / 'mmsecvit' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


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
    zip_safe=False,
)
