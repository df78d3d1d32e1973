"""``python -m scgeneformer`` (and ``torchrun -m scgeneformer``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
