from larp.quickstart.run import main

main()
