"""sentijax: targeted sentiment distillation of teacher LLMs into small JAX/Flax students."""
import setuptools

setuptools.setup(
    name="sentijax",
    version="0.1.0",
    description="KnowDist + ICLDist sentiment distillation and the SentiBench scorer in JAX/Flax.",
    packages=setuptools.find_packages(include=["sentijax", "sentijax.*"]),
    package_data={"sentijax": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    # Ranges measured (see README "Tested stack"): jax 0.10.2 on CPU (tests), 0.11.2 on H200.
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml_collections>=1.1.0,<2",
        "transformers>=5.23.0,<6",
        "tokenizers>=0.23.3,<0.24",
        "safetensors>=0.8.0,<0.9",
        "datasets>=5.2.0,<6",
        "tensorflow-datasets>=4.9.10,<5",
        "grain>=0.2.18,<0.3",
        "array-record",
        "numpy>=2.4,<3",
        "ml_dtypes",
        "absl-py",
        "tqdm",
        "httpx>=0.27,<1",  # teacher generation: OpenAI-compatible client
        "tensorboardX",
        "matplotlib",
        "scikit-learn",
        "constriction>=0.5.0,<0.6",  # top-k store v4: range coder (bench/README.md: -35.7 B/pos)
    ],
    extras_require={
        # torch is only the parity reference in tests; the exact pin selects the CPU wheel.
        "test": ["pytest", "pytest-xdist", "nbformat", "torch==2.13.0", "openai>=1.40,<4"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.12"],
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
    },
)
