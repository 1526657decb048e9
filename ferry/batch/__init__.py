"""Batch inference past one machine (`ferry batch`): Ray Data reads the files (local paths or URIs
through pyarrow's filesystems, `ferry.batch.storage`), a pool of actors each holding one runtime
`Classifier` predicts and writes Parquet part files straight to the destination, and the driver
commits them (`_SUCCESS.json`). Depends on the runtime, Ray and pyarrow (`pip install 'ferry[scale]'`);
Ray is imported inside the functions that need it."""
