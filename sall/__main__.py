import sys

from sall.cli import main

sys.exit(main())
