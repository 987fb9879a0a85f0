"""`python -m cli COMMAND ...`, the same as `fareway COMMAND ...`."""

import sys

from cli.main import main

sys.exit(main())
