"""``python -m sae_lens_choice``: the ``sae-lens-choice`` command."""

import sys

from sae_lens_choice.cli import main

if __name__ == "__main__":
    sys.exit(main())
