from graphprune.command import guarded_main

raise SystemExit(guarded_main())
