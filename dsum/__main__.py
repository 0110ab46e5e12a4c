"""`python -m dsum`, which is also how `accelerate launch -m dsum` runs it."""

import sys

from dsum.cli import main

sys.exit(main())
