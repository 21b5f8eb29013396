"""`python -m herd ...` is the `herd` command."""
import sys

from herd.cli import main

sys.exit(main())
