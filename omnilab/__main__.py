from omnilab.cli import main

raise SystemExit(main())
