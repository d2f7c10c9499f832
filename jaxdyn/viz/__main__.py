from jaxdyn.cli.viz import main

main()
