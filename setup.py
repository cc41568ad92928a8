"""Install reptile_fast; the Triton kernels in ``kernels/`` install as ``reptile_fast.kernels``."""
from setuptools import setup

setup(
    name="reptile_fast",
    version="0.1.0",
    description="Fast Reptile meta-learning (Nichol, Achiam, Schulman 2018) with a seed-faithful reference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "reptile_fast",
        "reptile_fast.backends",
        "reptile_fast.distributed",
        "reptile_fast.tasks",
        "reptile_fast.kernels",
    ],
    # kernels/ lives at the top of the tree (the user's layout) but is imported as
    # reptile_fast.kernels: a top-level module named ``kernels`` would clash with PyPI.
    package_dir={"reptile_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.16",  # tested: 2.11 (the GPU machine's), 2.13, 2.14.1 and 2.15.0; nothing older
        "numpy",
        "matplotlib",
        "pillow",  # the Omniglot loaders decode PNGs (also a dependency of matplotlib's)
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],  # tested: 3.6, 3.8 and 3.9 (interpreter, sm_90a AOT); nothing older
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],  # xdist: the suite on every core
    },
    entry_points={"console_scripts": ["reptile-fast=reptile_fast.cli:main"]},
)
