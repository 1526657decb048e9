"""The models ferry trains and exports, shared by `ferry.train` and `ferry.export` (neither imports
the other): the digit CNN, torchvision classifiers by name (weights, heads, preprocessing, labels)
and the checkpoint formats. torch is imported by the submodules only."""
