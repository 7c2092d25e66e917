"""saro_jax: SaRO safety alignment (Reasoning-style Warmup SFT -> SRPO DPO) in JAX / Flax NNX."""

__version__ = "0.1.0"
