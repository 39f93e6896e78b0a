"""Adapters that run sgpo_jax's exact follower inside other JAX training libraries."""
