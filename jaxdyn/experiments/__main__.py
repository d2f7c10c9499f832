from jaxdyn.cli.experiments import main

main()
