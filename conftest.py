# Hypothesis settings: in CI (CI=true) every run draws the same examples, so a red build is reproducible.
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
