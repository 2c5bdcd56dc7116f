"""``python -m redisengines``: the same CLI as the ``redisengines`` command."""

from .cli import main

main()
