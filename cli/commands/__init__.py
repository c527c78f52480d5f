"""One module per ``namm`` command; :mod:`cli.main` registers their functions."""
