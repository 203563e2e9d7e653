"""``python -m starkit`` runs the same CLI as the ``starkit`` command."""
import sys

from starkit.cli import run

if __name__ == "__main__":
    sys.argv[0] = "starkit"  # usage lines (jsonargparse's --*.help parsers too) name the command, not __main__.py
    run()
