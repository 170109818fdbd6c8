"""The embedded demo (SmolLM2-135M on Shakespeare, offline) and its assets."""

from attribindex.demo._assets import demo_model_dir, load_shakespeare_speeches, shakespeare_speeches_by_id
from attribindex.demo._run import DEFAULT_SPEECHES, DEMO_QUERIES, DemoQuery, demo_corpus, run_demo

__all__ = [
    "DEFAULT_SPEECHES",
    "DEMO_QUERIES",
    "DemoQuery",
    "demo_corpus",
    "demo_model_dir",
    "load_shakespeare_speeches",
    "run_demo",
    "shakespeare_speeches_by_id",
]
