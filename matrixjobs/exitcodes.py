"""Exit codes of every `matrixjobs` command, so scripts can tell the cases apart."""

EXIT_OK = 0
EXIT_FAILED = 1  # an error, a failed check, a job that failed or was cancelled, a refused request
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # the service's API could not be reached
EXIT_INTERRUPTED = 130  # Ctrl-C
