"""The GPU session's former entry point, kept so that `python -m dist_llama.gpu_session ...` still works;
the session lives in dist_llama/session/ (its package docstring says which module holds what)."""

import sys

from dist_llama.session.cli import main

if __name__ == "__main__":
    sys.exit(main())
