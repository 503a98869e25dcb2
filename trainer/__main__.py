"""``python -m trainer`` works like the ``trainer`` command."""

import sys

from trainer.cli import main

sys.exit(main())
