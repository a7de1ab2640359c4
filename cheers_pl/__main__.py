"""``python -m cheers_pl`` runs the ``cheers`` command."""

import sys

from cheers_pl.cli import main

sys.exit(main())
