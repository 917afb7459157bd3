"""Dock widgets declared in napari.yaml."""
