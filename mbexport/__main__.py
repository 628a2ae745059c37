from mbexport.cli import main

main()
