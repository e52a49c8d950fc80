"""python -m bench.sim [--small] [options]: see bench/sim/runner.py and bench/sim/engine.py."""

from bench.sim.runner import main

if __name__ == "__main__":
    main()
