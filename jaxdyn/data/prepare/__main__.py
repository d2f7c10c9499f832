from jaxdyn.cli.data import main

main()
