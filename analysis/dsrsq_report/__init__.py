"""dsrsq post-processing: tables and figures from results/<run>/run.h5 files."""

from .reader import ReportError, read_run  # noqa: F401
