"""lm: a JAX/Flax codebase that carries a language-model study from raw text to fitted scaling law."""

__version__ = "0.1.0"
