"""The `screener` subcommands: argument parsing and printing; the work is done by the library modules."""
