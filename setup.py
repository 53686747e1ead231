"""Build and install tec_fast.

The pure-Python package ``tec_fast`` and the Triton kernels in ``kernels/`` (installed as
``tec_fast.kernels``) always install. The C++ extension (``csrc/``) builds with ninja through
``torch.utils.cpp_extension``; the CUDA part only where torch has CUDA and nvcc exists, or with
FORCE_CUDA=1. Install with ``pip install --no-build-isolation -e .`` (torch must already be
installed: the build imports it).
"""
from setuptools import setup

setup(
    name="tec_fast",
    version="0.1.0",
    description="Fast TEC (Target-Enhanced Conditional) self-supervised ViT pretraining",
    python_requires=">=3.10",
    packages=["tec_fast", "tec_fast.ops", "tec_fast.kernels"],
    package_dir={"tec_fast": "tec_fast", "tec_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.0; platform_system=='Linux'",
    ],
    extras_require={
        "demo": ["scikit-learn>=1.3", "pillow"],
        "test": ["pytest>=7", "scikit-learn>=1.3", "pillow"],
    },
)
