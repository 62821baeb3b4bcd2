import os

# Two processes share two cores in the distributed and end-to-end tests: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
