"""``python -m hmlib``: same as the ``hmlib`` console script."""
from hmlib.cli import main

raise SystemExit(main())
