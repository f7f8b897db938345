"""``python -m gpt2scratch`` is the ``gpt2-scratch`` command."""

import sys

from gpt2scratch.cli import main

sys.exit(main())
