"""sentijax: targeted sentiment distillation of teacher LLMs into small JAX/Flax students."""

__version__ = "0.1.0"
