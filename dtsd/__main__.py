from .daemon import main

main(prog_name="dtsd")
