import sys

try:
    from lorun_fast.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python was still importing
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
