"""``python -m data_recipes RECIPE ...``."""

import sys

from data_recipes.cli import main

sys.exit(main())
