from jaxdyn.cli.evaluate import main

main()
