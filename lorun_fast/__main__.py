"""``python -m lorun_fast`` and the ``lorun-fast`` console script."""
import os
import sys


def run() -> None:
    try:
        from lorun_fast.cli import install_interrupt_handler, main

        install_interrupt_handler()
        code = main()
    except KeyboardInterrupt:  # Ctrl-C while Python was still importing
        print("interrupted", file=sys.stderr)
        code = 130
    if code == 130:
        # A KeyboardInterrupt that went through C code (torch's import runs Python code from C) makes CPython end
        # the process with SIGINT at exit even though it was caught; leave with the documented status instead.
        # Everything an interrupted command writes is written (atomically) before it returns.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
