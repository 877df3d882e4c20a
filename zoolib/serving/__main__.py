"""`python -m zoolib.serving WORKSPACE ...`: the HTTP endpoint (see `cli`)."""
from .cli import main

main()
