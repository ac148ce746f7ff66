"""``python -m cloud.cli``."""

import sys

from cloud.cli import main

sys.exit(main())
