from merge.console import main

main()
