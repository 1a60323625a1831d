"""Subcommands of the `softvq-fast` console script (see `softvq_fast.cli`)."""
