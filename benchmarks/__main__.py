"""``python -m benchmarks`` (or ``python3 dev.py bench``): see ``_main.py``."""

import sys

from ._main import main

sys.exit(main())
