"""The shapes world: 1-4 coloured shapes on a 3x3 grid, with captions, questions, POPE splits,
multi-image and video tasks (see lmm.worlds.shapes.config).
"""
