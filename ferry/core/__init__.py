"""What every ferry stage shares: errors, atomic file writes, the machine description, the MNIST
IDX reader and a progress bar. The standard library and numpy only: nothing heavy is imported here."""
