"""The ``hf-hybrid`` console script.

``import hf_hybrid`` registers the model family with transformers' Auto classes, which loads torch and
transformers (seconds). The command line is parsed first, with the package's ``__init__`` not yet run, so
``hf-hybrid --help`` and argument errors answer at once; the package is then initialised as usual and the
subcommand runs. The parser and the handlers are ``hf_hybrid.cli``; ``python -m hf_hybrid.cli`` is the same
command without this shortcut.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    if "hf_hybrid" in sys.modules:  # already imported (e.g. called from Python): nothing to save
        from hf_hybrid.cli import main as cli_main

        return cli_main(argv)
    spec = importlib.util.find_spec("hf_hybrid")  # finds the package without running its __init__
    if spec is None or spec.loader is None:
        raise SystemExit("hf-hybrid: the hf_hybrid package is not installed")
    package = importlib.util.module_from_spec(spec)
    sys.modules["hf_hybrid"] = package  # submodules import against it; its __init__ runs below
    try:
        from hf_hybrid.cli import build_parser, run

        args = build_parser().parse_args(argv)
    except BaseException:  # --help, a usage error: leave no half-initialised package behind
        for name in [n for n in sys.modules if n == "hf_hybrid" or n.startswith("hf_hybrid.")]:
            del sys.modules[name]
        raise
    spec.loader.exec_module(package)  # the ordinary `import hf_hybrid`: registers the model family
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
