"""`python -m kdcache`, which is also what `accelerate launch -m kdcache` runs."""

from .cli import main

main()
