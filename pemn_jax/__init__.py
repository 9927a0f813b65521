"""pemn_jax: compact networks whose parameters are pure functions of a small vector."""

__version__ = '0.1.0'
