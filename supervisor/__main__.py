from supervisor.entry import main

raise SystemExit(main())
