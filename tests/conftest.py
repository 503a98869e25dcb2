"""Settings for the whole suite.

Property tests (hypothesis) draw the same examples on every run: a new random draw that finds
a new bug fails one CI run in several and not the next, which is a flaky suite, not a finding.
``HYPOTHESIS_PROFILE=explore`` draws new examples each run, to look for such bugs on purpose;
what it finds becomes an ``@example`` of its test.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
