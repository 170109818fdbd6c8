from attribindex.cli import main

main()
