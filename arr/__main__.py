from arr.cli import main

raise SystemExit(main())
