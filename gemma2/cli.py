"""What every command-line script shares: a user error is one line on stderr and exit status 2.

User errors are the library's ValueError (CheckpointError included) and FileNotFoundError, whose
messages name the fix; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    try:
        code = main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
