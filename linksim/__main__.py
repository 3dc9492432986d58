"""python -m linksim: the delaying, byte-counting TCP relay (same options as python -m linksim.relay)."""

import sys

from linksim.relay import main

sys.exit(main())
