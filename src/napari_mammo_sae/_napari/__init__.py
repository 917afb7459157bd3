"""napari adapters: reader, sample data, layers and widgets. Only this sub-package imports Qt/napari."""
