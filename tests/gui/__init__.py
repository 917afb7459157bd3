"""Tests that need a napari viewer (marked ``gui``; run headless under Xvfb via pytest-xvfb)."""
