"""``python -m graphopt.cli``: the same as the ``graphopt`` command."""
import sys

from graphopt.cli import main

sys.exit(main())
