from jaxdyn.evaluate.perplexity import main

main()
