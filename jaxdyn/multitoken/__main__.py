from jaxdyn.cli.multitoken import main

main()
