import sys

from didi.cli import main

sys.exit(main())
