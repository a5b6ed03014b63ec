"""ml_collections configs, one per experiment; each docstring names what it reproduces and the command."""
