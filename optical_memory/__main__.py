import sys

from optical_memory.apps.cli import main

sys.exit(main())
