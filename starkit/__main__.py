"""``python -m starkit`` runs the same CLI as the ``starkit`` command."""
from starkit.cli import run

if __name__ == "__main__":
    run()
