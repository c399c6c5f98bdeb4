from distbp.cli import main

main()
