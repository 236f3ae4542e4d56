from graphprune.cli import guarded_main

raise SystemExit(guarded_main())
