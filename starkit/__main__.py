"""``python -m starkit`` runs the same CLI as the ``starkit`` command."""
from starkit.cli import main

if __name__ == "__main__":
    main()
