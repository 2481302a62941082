"""Subcommands of the ``kimi-linear`` CLI, one module each (see ``kimi_linear.cli``)."""
