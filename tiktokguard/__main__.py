import sys

from tiktokguard.cli import main

sys.exit(main())
