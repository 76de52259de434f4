"""Test-only: a `heartmula-rt serve` child started with this folder on PYTHONPATH and
HEARTMULA_RT_TEST_HOLD_CODEC=1 never lets its live codec start a song's audio (the codec's
thread waits for good), so a test can kill the server after a song's LM part has ended and
before the codec has touched it (tests/test_serve_killed.py). Nothing else changes."""

import os

if os.environ.get("HEARTMULA_RT_TEST_HOLD_CODEC") == "1":
    import threading

    from heartmula_rt.runtime import runner

    def _held(self, song, new):  # the codec's thread: wait until the process is killed
        threading.Event().wait()

    runner.CodecStage._live_step = _held
