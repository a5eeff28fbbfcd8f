from lbcc.cli import main

main()
