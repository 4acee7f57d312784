"""Domain U, the simulated guest: its memory (with the dirty log), the layout of that
memory, and the console OS that lives entirely inside it."""
