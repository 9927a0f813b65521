"""Directed evolution: post-training sparsification, bit allocation, encoding."""
