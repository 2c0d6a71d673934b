"""Progress: what handlers report, the events everyone sees, and the monitor between them."""

from matrixjobs.progress.events import JobProgressEvent
from matrixjobs.progress.monitor import ProgressMonitor
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.progress.subscription import Subscription

__all__ = ["JobProgressEvent", "ProgressMonitor", "ProgressReporter", "Subscription"]
