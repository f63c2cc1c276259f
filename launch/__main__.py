"""`python -m launch` is the same as `moerun`."""

import sys

from launch.cli import main

sys.exit(main())
