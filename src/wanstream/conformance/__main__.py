from wanstream.conformance.runner import main

raise SystemExit(main())
