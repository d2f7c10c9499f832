"""`python -m jaxdyn.generate`: the generation command (jaxdyn/cli/generate.py)."""

from jaxdyn.cli.generate import main

if __name__ == "__main__":
    main()
