"""``python -m tests.bench``: run the whole suite (see :mod:`tests.bench.run`)."""

from .run import main

raise SystemExit(main())
