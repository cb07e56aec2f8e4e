from fusesqlite.cli import main

raise SystemExit(main())
