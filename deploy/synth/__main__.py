"""``python -m deploy.synth ct|mr ...`` (same as ``edge-deploy synth ...``)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
