"""``python -m tokenbatcher`` runs the demo (see ``tokenbatcher._demo``)."""

import sys

from ._demo import main

sys.exit(main())
