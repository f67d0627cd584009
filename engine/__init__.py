"""The training engine: command line, distributed set-up, data wiring, the Trainer and its loops."""
