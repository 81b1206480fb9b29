"""Command-line programs: `kaffe` and its subcommands."""
