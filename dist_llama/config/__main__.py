"""`python -m dist_llama.config --config FILE [overrides]`: print the resolved config."""

from dist_llama.config.loading import main

main()
