from graphprune.cli import main

raise SystemExit(main())
