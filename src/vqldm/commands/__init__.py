"""The subcommands that are more than one call: sample, check, evaluate, demo, benchmark."""
