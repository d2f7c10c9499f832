from jaxdyn.cli.bench import main

raise SystemExit(main())
