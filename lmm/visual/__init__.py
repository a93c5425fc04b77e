"""The image-side contract the data and model sides share: the tower's image spec, AnyRes grids,
video frames, how many tokens each visual becomes and how its features are arranged, and the
batch of pixels.
"""
