"""`python -m jaxdyn.generate`: the generation command (see `jaxdyn.decode`)."""

from jaxdyn.decode.generate import main

if __name__ == "__main__":
    main()
