"""Batch inference past one machine (`ferry batch`): Ray Data reads the files, a pool of actors each
holding one runtime `Classifier` predicts, Parquet holds the results. Depends on the runtime and
Ray (`pip install 'ferry[scale]'`); Ray is imported inside the functions that need it."""
