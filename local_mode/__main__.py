"""`python -m local_mode`: the demo, as `make demo` runs it; with `--loop`, the closed loop once
(`make demo-loop`, local_mode/loop.py), whose imports plain `make demo` never pays for."""

import sys

if "--loop" in sys.argv[1:]:
    from local_mode.loop import main
else:
    from local_mode.demo import main

sys.exit(main())
