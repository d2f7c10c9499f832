from jaxdyn.cli.temporal import main

main()
