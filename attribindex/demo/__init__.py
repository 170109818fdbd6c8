"""The embedded demo (SmolLM2-135M on Shakespeare, offline) and its assets."""

from attribindex.demo._assets import demo_model_dir, load_shakespeare_speeches
from attribindex.demo._run import run_demo

__all__ = ["demo_model_dir", "load_shakespeare_speeches", "run_demo"]
