"""`python -m local_mode`: the demo, as `make demo` runs it."""

import sys

from local_mode.demo import main

sys.exit(main())
