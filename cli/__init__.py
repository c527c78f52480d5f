"""The ``namm`` command-line interface (typer). Thin: every command calls the library."""
