"""``python -m keyface ...``: see :mod:`keyface.cli`."""

from .cli import main

raise SystemExit(main())
