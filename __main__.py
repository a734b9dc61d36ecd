import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and diffusers are still importing
    print("cancelled: nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
