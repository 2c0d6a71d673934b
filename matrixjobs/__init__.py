"""matrixjobs: run long jobs from a Matrix room and watch them progress live."""

__version__ = "0.1.0"
