from meshagent_gui.cli import main

raise SystemExit(main())
