"""The `blip2-edge` process (`python -m runtime.cli ...` and the installed command).

Only `sys` and the start-up handler are imported before the handler is set: every import after it,
the command's own included, is covered (runtime/cli/start_up.py).
"""

import sys

from runtime.cli.start_up import end_at_once_on_ctrl_c


def run() -> None:
    end_at_once_on_ctrl_c()
    from runtime.cli.main import main  # after the handler: these imports are start-up too

    sys.exit(main())


if __name__ == "__main__":
    run()
