"""``python -m objcrop`` (and ``torchrun -m objcrop``) run the command line."""

import sys

from objcrop.cli import main

sys.exit(main())
