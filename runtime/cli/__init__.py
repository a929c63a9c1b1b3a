"""The `blip2-edge` command line: `main.py` dispatches to a module per group of subcommands."""
