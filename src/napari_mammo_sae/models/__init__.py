"""Backbones, concept heads, sparse autoencoders, checkpoint conversion and weight files."""
