"""
world/ - the shapes world (ours, DESIGN 10): the method on a CPU, in one folder the stages never import.

  scenes.py      the subjects and scenes: shapes x colours x textures on backgrounds, with relations,
                 attributes and actions; draw_sample is make_data.py's drawn source for the tiny and
                 shapes presets ("source": "world.scenes:draw_sample") and bench.py's procedural PSRBench
  perception.py  the reward stand-ins: a SegFormer detector (SegmenterDetector), a ViT embedder and a
                 program judge (ShapesJudge), loaded by rewards.py through detector.json and judge.json
  build.py       trains the VAE, the single-reference base editor and the stand-ins: `python -m world`

The stages reach the world only by the names in configs/shapes.json and configs/tiny.json and in
the model folders (common.load_named imports them), never by an import statement; tests/test_layout.py
checks every import of the project.
"""
