import sys

from optical_memory.cli import main

sys.exit(main())
