import sys

from pyvfio.cli import main

sys.exit(main())
