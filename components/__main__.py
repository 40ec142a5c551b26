"""`python -m components ...` is the same as the `tlpipe` command."""

from components.apps.cli import main

raise SystemExit(main())
