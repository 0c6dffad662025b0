"""``python -m pypline.worker_agent``: the same as the ``pypline-agent`` console script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="pypline-agent")
