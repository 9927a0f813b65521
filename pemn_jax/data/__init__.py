"""Data: TFDS builders for local files and the input pipeline."""
