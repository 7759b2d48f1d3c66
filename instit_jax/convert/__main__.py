import sys

from instit_jax.convert.cli import main

sys.exit(main())
