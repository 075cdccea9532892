import sys

from dist_llama.session.cli import main

sys.exit(main())
