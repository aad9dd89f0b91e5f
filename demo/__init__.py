"""End-to-end orchestration for the README's main command. May import every other package."""
