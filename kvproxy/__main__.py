from kvproxy.cli import main

main()
