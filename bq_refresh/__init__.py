"""Foundations shared by every layer of bq-refresh: settings, errors, local services.

Imported before anything else of the project (flows/, tasks/ and blocks/ import it first), so it also chooses the
Arrow memory pool, which pyarrow fixes when it is first imported: jemalloc, which hands the memory of freed batches
back where mimalloc (pyarrow's default in its Linux wheels) keeps it (bench/run.py: the 1M-row initial load and
reload peaked about 50 MB lower). ARROW_DEFAULT_MEMORY_POOL set by the user wins.
"""

import os

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
