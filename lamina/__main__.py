"""`python -m lamina` runs the `lamina` command."""

from lamina.cli import main

raise SystemExit(main())
