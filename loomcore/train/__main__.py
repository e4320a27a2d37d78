from loomcore.train.cli import main

raise SystemExit(main())
