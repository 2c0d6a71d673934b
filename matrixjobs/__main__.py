"""`python -m matrixjobs` and the `matrixjobs` command."""

from matrixjobs.exitcodes import EXIT_INTERRUPTED


def run() -> int:
    try:
        # Imported here: a Ctrl-C while the service's modules load is an exit, not a traceback.
        from matrixjobs.cli import main

        return main()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(run())
