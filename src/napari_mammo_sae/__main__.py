"""``python -m napari_mammo_sae`` = the ``napari-mammo-sae`` command."""

import sys

from .cli import main

sys.exit(main())
