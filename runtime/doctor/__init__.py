"""`blip2-edge doctor`: the machine's capabilities (environment.py) and runs of an artifact on each backend (runs.py)."""
