"""`python -m amp_magics status|check`."""
from .cli import main

raise SystemExit(main())
