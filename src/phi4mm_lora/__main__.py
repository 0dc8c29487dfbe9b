import sys

from phi4mm_lora.cli import main

sys.exit(main())
