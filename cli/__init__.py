"""The `ttt-rag` command line: one Typer app whose subcommands parse arguments and call the owning package."""
