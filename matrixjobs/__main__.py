from matrixjobs.cli import main

raise SystemExit(main())
