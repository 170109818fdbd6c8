"""The test suite. Importing this package (pytest does, before any conftest or test module) keeps every test
off the network: hub ids must fail fast and cleanly, so the variables are set before transformers is imported."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
