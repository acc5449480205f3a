"""`python -m world` builds the shapes world's models into world-models/ (world/build.py)."""
import common
from world.build import Config, main

common.run_stage("world", main, common.parse_config(Config, "world"))
