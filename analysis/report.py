#!/usr/bin/python3
"""Entry point: /usr/bin/python3 analysis/report.py RUN.h5 [...] -o DIR [--print] | --compare A B | --check RUN."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsrsq_report.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
