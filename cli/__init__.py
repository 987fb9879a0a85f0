"""The `fareway` command: one subcommand per job, each a module of this package (main.py lists
them). The application layer: it may import every package below it (fareway, gateway, workers,
accounting), and none of them imports it."""
