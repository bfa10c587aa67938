"""``python -m relibra`` runs the ``relibra`` console script."""

from .cli import main

raise SystemExit(main())
