#!/usr/bin/env bash
# The full demo as a check: the demo test (tests/demo/test_demo.py) on the default demo, 300 sampled speeches plus
# the 6 its queries come from (about 2 minutes), where the test suite runs it on 40 to stay fast. Every query must
# still find its own speech first, clearly ahead of the second.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
ATTRIBINDEX_DEMO_SPEECHES=300 exec .venv/bin/python -m pytest -q tests/demo/test_demo.py \
  -k test_demo_traces_every_query_to_its_own_speech_at_rank_1 "$@"
