import os

# Tests start their own embedded Ray clusters; keep them small on 2-core machines.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
