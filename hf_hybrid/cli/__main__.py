"""``python -m hf_hybrid.cli``: the ``hf-hybrid`` command without the installed script."""

import sys

from . import main

sys.exit(main())
