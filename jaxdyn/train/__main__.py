from jaxdyn.train.loop import main

main()
