"""Training the handwritten-digit CNN (`ferry train`). torch is imported by the submodules only."""
