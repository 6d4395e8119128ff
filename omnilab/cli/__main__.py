"""`python -m omnilab.cli`, as `python -m omnilab`."""

from omnilab.cli import main

raise SystemExit(main())
