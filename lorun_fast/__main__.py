import sys

from lorun_fast.cli import main

sys.exit(main())
