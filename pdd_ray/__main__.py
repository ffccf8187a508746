"""``python -m pdd_ray`` is the same as ``pdd-ray``."""

import sys

from pdd_ray.cli import main

sys.exit(main())
