"""Entry point for ``python -m reference_impl``."""

import sys

from .cli import main

sys.exit(main())
