"""``python -m chatcore_store rooms|history ...``: the store's verbs without the server."""

import sys

from .cli import main

sys.exit(main())
