"""Entry point of the packaged app (MAP): `python <app folder>` runs app.main()."""

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())
