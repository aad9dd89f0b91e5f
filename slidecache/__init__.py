"""The `slidecache` command: one console script over the stages' own commands (see __main__)."""
