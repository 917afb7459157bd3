"""napari-mammo-sae: look inside mammography foundation models with sparse autoencoders."""

__version__ = "0.1.0"
