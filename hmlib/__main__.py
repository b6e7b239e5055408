"""``python -m hmlib``: same as the ``hmlib`` console script."""
from hmlib.console import main

raise SystemExit(main())
