"""The HTTP server (``codegen2 serve``): protocol.py (wire formats), app.py (routes), cli.py (the command)."""
