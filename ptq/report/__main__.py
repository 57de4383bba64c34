"""`python -m ptq.report`."""

import sys

from ptq.report.cli import main

sys.exit(main())
