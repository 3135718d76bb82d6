"""A sampling run (sample.py): the job and its checks, the chunked output folder, the sharded run with FVD."""
