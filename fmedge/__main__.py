"""`python3 -m fmedge`: refuse old Pythons in one line, then run the CLI."""

import sys

if sys.version_info < (3, 9):  # written without f-strings so old Pythons can parse it
    sys.stderr.write("fm-edge needs Python 3.9 or newer; this is Python %d.%d\n"
                     % sys.version_info[:2])
    sys.exit(2)

from fmedge.cli import main  # noqa: E402

sys.exit(main())
