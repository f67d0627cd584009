"""What every layer shares: the user-facing error classes and facts about the host."""
