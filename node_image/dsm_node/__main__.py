from dsm_node.cli import main

raise SystemExit(main())
