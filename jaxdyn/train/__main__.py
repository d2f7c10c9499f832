from jaxdyn.cli.train import main

main()
