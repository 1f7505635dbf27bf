import sys

from plait.runtime.cli import main

sys.exit(main())
