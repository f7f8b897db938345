"""Train GPT-2 on input.txt: `python train.py [flags]` is `gpt2-scratch train [flags]` (see --help)."""

import sys
from pathlib import Path

try:
    from gpt2scratch.cli import main
except ImportError:  # a checkout that is not pip-installed: use the package beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from gpt2scratch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], exiting=True))
