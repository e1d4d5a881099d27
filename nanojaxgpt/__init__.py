"""nanojaxgpt: GPT-2 pretraining in JAX + Equinox."""
